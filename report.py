"""Results of many runs -> the paper's table layout (Markdown + CSV), few-shot table, plots.

Reads the run directories the ``.sh`` launchers write under --runs (default ``runs``):

    train_domain/<task>/<domain>/seed<S>/results.json           single-domain teacher
    train_multi_domain/<task>/seed<S>/results.json              multi-domain teacher
    train_pooled/<task>/seed<S>/results.json                    one head, pooled domains (mix)
    labels_only_domain/<task>/<domain>/seed<S>/results.json     student on the labels alone
    labels_only_multi_domain/<task>/seed<S>/results.json        the same, multi-domain
    finetune_domain/<task>/<domain>/seed<S>/results.json        TinyBERT-KD student
    finetune_multi_domain/<task>/<variant>/seed<S>/results.json multi-domain students
    train_meta_teacher/<task>/seed<S>/results.json              Meta-KD's meta-teacher
    finetune_metakd/<task>/<domain>/seed<S>/results.json        Meta-KD student
    tfidf/<task>/<domain>/results.json                          TF-IDF baseline (deterministic)
    fewshot/p<percent>/...                                      the same layout per ratio

Writes into --out (default <runs>/report): results_<task>.md/.csv, comparisons_<task>.md/.csv
(the key differences seed by seed, a paired t-test and the test sets' binomial error),
fewshot_<task>.md/.csv and fewshot_<task>.png (accuracy against the training ratio),
tradeoff_<task>.md/.csv and tradeoff_<task>.png (test accuracy against batch-1 latency and size
of every deployed form of every run with a deployment.json: deploy_eval.py),
domain_weights_<task>.md/.csv (each domain's mean weight and spread) and
domain_weights_<task>_<variant>_seed<S>.png (w[l, d] over training, a panel per level) for runs
that logged domain weights, and with --study_domain D study_<task>.md/.csv. Prints the tables.

    python report.py --runs runs
Cells are test accuracy (%) of each domain with that domain's best checkpoint; with several
seeds, mean +- standard deviation; a cell backed by a single run is marked with *.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

import plan
import utils
from data_processing import PROCESSORS
from variants import VARIANTS

# (row label, path of its run directories relative to the runs root, per-domain runs?); the
# stage-4 rows come from variants.py, the one list of stage-4 runs.
SINGLE_TEACHER, MULTI_TEACHER, TINYBERT_KD = ("Single-domain teacher", "Multi-domain teacher",
                                              "TinyBERT-KD")
LABELS_ONLY_SINGLE = "Student on the labels alone (single-domain)"
LABELS_ONLY_MULTI = "Student on the labels alone (multi-domain)"
MIX_TEACHER = "Mix teacher (pooled domains, one head)"
META_TEACHER, META_KD = "Meta-teacher (Meta-KD stage A)", "Meta-KD"
METHODS: List[Tuple[str, str, bool]] = [
    ("TF-IDF + logistic regression", "tfidf/{task}/{domain}", True),
    (SINGLE_TEACHER, "train_domain/{task}/{domain}", True),
    (MULTI_TEACHER, "train_multi_domain/{task}", False),
    (MIX_TEACHER, "train_pooled/{task}", False),
    (LABELS_ONLY_SINGLE, "labels_only_domain/{task}/{domain}", True),
    (LABELS_ONLY_MULTI, "labels_only_multi_domain/{task}", False),
    (META_TEACHER, "train_meta_teacher/{task}", False),
    (TINYBERT_KD, "finetune_domain/{task}/{domain}", True),
] + [(variant.label, f"finetune_multi_domain/{{task}}/{name}", False)
     for name, variant in VARIANTS.items()] + [
    (META_KD, "finetune_metakd/{task}/{domain}", True),
]
# Rows shown even when no run exists (the paper's table); the others only when present.
PAPER_ROWS = {SINGLE_TEACHER, MULTI_TEACHER, TINYBERT_KD} | {
    variant.label for variant in VARIANTS.values() if variant.paper}
# The differences the study is about: (method, against), each paired seed by seed.
COMPARISONS: List[Tuple[str, str]] = [
    (VARIANTS["hrkd"].label, VARIANTS["no_graph"].label),
    (VARIANTS["hrkd"].label, VARIANTS["uniform"].label),
    (VARIANTS["hrkd"].label, VARIANTS["no_hierarchy"].label),
    (VARIANTS["hrkd"].label, TINYBERT_KD),
    (TINYBERT_KD, LABELS_ONLY_SINGLE),
    (VARIANTS["no_graph"].label, LABELS_ONLY_MULTI),
    (VARIANTS["hrkd"].label, LABELS_ONLY_MULTI),
    (TINYBERT_KD, SINGLE_TEACHER),
    (VARIANTS["hrkd"].label, MULTI_TEACHER),
    (VARIANTS["hrkd"].label, META_KD),
    (META_KD, TINYBERT_KD),
    (META_KD, META_TEACHER),
    (META_TEACHER, MIX_TEACHER),
]


def _test_accuracy(run_dir: str, domain: str) -> Optional[float]:
    """A finished run's test accuracy on ``domain`` (a stopped run's figures are left out)."""
    path = os.path.join(run_dir, "results.json")
    if utils.run_status(run_dir, need_test=True)["state"] != "finished":
        return None
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    value = results.get("test", {}).get("per_domain", {}).get(domain)
    return None if value is None else 100.0 * float(value)


def seed_dirs(pattern_dir: str) -> List[str]:
    """The seed<S> runs of a method, or the folder itself for a seedless (deterministic) one."""
    if os.path.isfile(os.path.join(pattern_dir, "results.json")):
        return [pattern_dir]
    return sorted(glob.glob(os.path.join(pattern_dir, "seed*")))


def task_domains(root: str, task: str) -> List[str]:
    """The task's domains: the processor's, or for data that names its own domains (custom)
    those recorded in the config.json of the first multi-domain run found under ``root``."""
    if PROCESSORS[task].domains:
        return list(PROCESSORS[task].domains)
    for path in sorted(glob.glob(os.path.join(root, "**", "config.json"), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        if config.get("args", {}).get("task") == task and len(config.get("domains", [])) > 1:
            return list(config["domains"])
    return []


def collect(root: str, task: str) -> Dict[str, Dict[str, List[float]]]:
    """{method: {domain: [accuracy of each seed]}} for every method with at least one run."""
    domains = task_domains(root, task)
    table: Dict[str, Dict[str, List[float]]] = {}
    for label, template, per_domain in METHODS:
        cells: Dict[str, List[float]] = {}
        for domain in domains:
            folder = os.path.join(root, template.format(task=task, domain=domain))
            values = [_test_accuracy(run, domain) for run in seed_dirs(folder)]
            cells[domain] = [v for v in values if v is not None]
        if any(cells.values()) or label in PAPER_ROWS:
            table[label] = cells
    return table


def collect_by_seed(root: str, task: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{method: {seed folder: {domain: accuracy}}}, for pairing methods seed by seed."""
    domains = task_domains(root, task)
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for label, template, _ in METHODS:
        seeds: Dict[str, Dict[str, float]] = {}
        for domain in domains:
            folder = os.path.join(root, template.format(task=task, domain=domain))
            for run in seed_dirs(folder):
                value = _test_accuracy(run, domain)
                if value is not None:
                    seeds.setdefault(os.path.basename(run), {})[domain] = value
        table[label] = {seed: cells for seed, cells in seeds.items() if len(cells) == len(domains)}
    return table


def test_set_sizes(root: str, task: str) -> Dict[str, int]:
    """Each domain's number of test examples, as the runs' results.json record them."""
    domains, sizes = task_domains(root, task), {}
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle).get("test", {}).get("examples_per_domain") or {}
        sizes.update({d: int(n) for d, n in recorded.items() if d in domains})
        if len(sizes) == len(domains):
            return sizes
    return {}


def binomial_se(accuracy: Dict[str, float], sizes: Dict[str, int]) -> Optional[float]:
    """Standard error (points) of the domain-averaged test accuracy from the test sets' size
    alone: sqrt(sum_d p_d (1 - p_d) / n_d) / D."""
    if not sizes or not accuracy:
        return None
    variance = sum((p / 100) * (1 - p / 100) / sizes[d] for d, p in accuracy.items())
    return 100 * float(np.sqrt(variance)) / len(accuracy)


COMPARISON_HEADER = ["Comparison", "seeds", "per-seed difference", "mean ± std",
                     "paired t-test p", "binomial SE of one average", "verdict"]


def comparison_rows(root: str, task: str):
    """The key differences of domain-averaged test accuracy, seed by seed (seeds both methods
    ran), their mean and std, a paired t-test, and the binomial error of one average."""
    from scipy import stats
    by_seed = collect_by_seed(root, task)
    sizes = test_set_sizes(root, task)
    rows = []
    for method, against in COMPARISONS:
        mine, theirs = by_seed.get(method, {}), by_seed.get(against, {})
        # Teachers pair with students by seed too (a student of seed S distils teacher S).
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        diffs = [float(np.mean(list(mine[s].values())) - np.mean(list(theirs[s].values())))
                 for s in seeds]
        se = binomial_se(mine[seeds[0]], sizes)
        spread = f"{np.mean(diffs):+.1f}" + (f" ± {np.std(diffs, ddof=1):.1f}"
                                             if len(diffs) > 1 else "")
        p_value, verdict = None, "one seed: no spread"
        if len(diffs) > 1:
            if np.std(diffs) == 0:
                p_value = 0.0 if np.mean(diffs) else 1.0
            else:
                p_value = float(stats.ttest_1samp(diffs, 0.0).pvalue)
            verdict = ("inside the seed spread" if p_value >= 0.05 else
                       f"{method if np.mean(diffs) > 0 else against} better (p < 0.05)")
        rows.append([f"{method} vs {against}", str(len(seeds)),
                     " ".join(f"{d:+.1f}" for d in diffs), spread,
                     "-" if p_value is None else f"{p_value:.3f}",
                     "-" if se is None else f"{se:.1f}", verdict])
    return COMPARISON_HEADER, rows


# The precision a run computed in, by its resolved --amp (config.json's args.amp).
PRECISIONS = {"off": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def hardware_of_rows(root: str, task: str) -> Dict[str, Dict[str, List[Optional[float]]]]:
    """{method: {machine and precision: one wall time per finished run}} from each run's
    config.json ("machine", recorded since 2026-12-02; older runs count as "not recorded"; the
    precision is the resolved --amp, where recorded) and timing.json (seconds of the training
    process; None where it is missing or the run was resumed, so that it timed a part only)."""
    found: Dict[str, Dict[str, List[Optional[float]]]] = {}
    for label, run in finished_runs(root, task):
        config = utils.read_json(os.path.join(run, "config.json"), None) or {}
        results = utils.read_json(os.path.join(run, "results.json"), {}) or {}
        machine = config.get("machine") or (
            "scikit-learn on the CPU" if results.get("method", "").startswith("tfidf")
            else "not recorded")
        amp = config.get("args", {}).get("amp")
        if amp:  # what the run computed in: the same CPU gives other figures in bf16
            machine += f"; {PRECISIONS.get(amp, amp)}"
        found.setdefault(label, {}).setdefault(machine, []).append(
            plan.wall_seconds(run, trust_mtime=False))  # a copy's mtime says nothing
    return found


def finished_runs(root: str, task: str):
    """(method, run folder) of every tested, finished run under ``root``, each folder once
    (a multi-domain run serves every domain)."""
    domains = task_domains(root, task)
    for label, template, _ in METHODS:
        for domain in domains:
            for run in seed_dirs(os.path.join(root, template.format(task=task, domain=domain))):
                if _test_accuracy(run, domain) is not None:
                    yield label, run
            if not template.count("{domain}"):
                break  # one run folder serves every domain


def hardware_footer(root: str, task: str, folders: Optional[List[str]] = None) -> str:
    """The hardware lines under a table: of the runs under ``root``, or summed over ``folders``
    (the few-shot ratios' roots)."""
    found: Dict[str, Dict[str, List[Optional[float]]]] = {}
    for folder in folders if folders is not None else [root]:
        for label, machines in hardware_of_rows(folder, task).items():
            for machine, seconds in machines.items():
                found.setdefault(label, {}).setdefault(machine, []).extend(seconds)
    lines = [f"- {label}: " + "; ".join(f"{machine} ({utils.plural(len(seconds), 'run')}"
                                       f"{_wall_range(seconds)})"
                                       for machine, seconds in machines.items())
             for label, machines in found.items()]
    return ("\nHardware of each row's runs (and the wall time of one run's training process, "
            "from timing.json):\n\n" + "\n".join(lines) + "\n") if lines else ""


def _wall_range(seconds: List[Optional[float]]) -> str:
    """'; 12-21 min a run' over the timed runs ('..., 3 timed' when some were not)."""
    timed = [s for s in seconds if s is not None]
    if not timed:
        return ""
    low, high = (round(min(timed) / 60), round(max(timed) / 60))
    text = f"; {low} min a run" if low == high else f"; {low}-{high} min a run"
    return text + (f", {len(timed)} timed" if len(timed) < len(seconds) else "")


def format_cell(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}*"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def average_over_domains(cells: Dict[str, List[float]]) -> List[float]:
    """Per-seed averages over domains (only seeds present in every domain count)."""
    if not cells or any(not v for v in cells.values()):
        return []
    runs = min(len(v) for v in cells.values())
    return [float(np.mean([cells[d][i] for d in cells])) for i in range(runs)]


def table_rows(table: Dict[str, Dict[str, List[float]]], domains: List[str]):
    header = ["Method"] + domains + ["Average"]
    rows = [[label] + [format_cell(cells[d]) for d in domains]
            + [format_cell(average_over_domains(cells))] for label, cells in table.items()]
    return header, rows


def to_markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(out_dir: str, name: str, header, rows, title: str,
                footer: str = "") -> str:
    os.makedirs(out_dir, exist_ok=True)
    markdown = f"### {title}\n\n" + to_markdown(header, rows)
    if any("*" in cell for row in rows for cell in row[1:]):
        markdown += "\n\\* a single run (no seed spread)\n"
    markdown += footer
    with open(os.path.join(out_dir, name + ".md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    with open(os.path.join(out_dir, name + ".csv"), "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header] + rows)
    return markdown


def fewshot_ratio_dirs(root: str) -> List[str]:
    """The fewshot/p<percent> folders under ``root``, smallest ratio first."""
    return sorted(glob.glob(os.path.join(root, "fewshot", "p*")),
                  key=lambda p: float(re.sub(r"[^0-9.]", "", os.path.basename(p)) or 0))


def ratio_label(folder: str) -> str:
    """'2%' for a fewshot/p2 folder."""
    return os.path.basename(folder)[1:] + "%"


def fewshot_comparison_rows(root: str, task: str):
    """The key comparisons at each few-shot ratio, paired by seed as the table's are (those
    whose two methods both ran at that ratio)."""
    rows = []
    for folder in fewshot_ratio_dirs(root):
        rows += [[ratio_label(folder)] + row for row in comparison_rows(folder, task)[1]]
    return ["Training data"] + COMPARISON_HEADER, rows


def fewshot_results(root: str, task: str) -> Dict[float, Dict[str, List[float]]]:
    """{percent: {method: per-seed averages over domains}} of the fewshot/p<percent> runs."""
    results = {}
    for folder in fewshot_ratio_dirs(root):
        table = collect(folder, task)
        averages = {label: average_over_domains(cells) for label, cells in table.items()}
        found = {m: v for m, v in averages.items() if v}
        if found:  # a ratio with runs of another task only is not this task's
            results[float(os.path.basename(folder)[1:])] = found
    return results


CHANCE = 50.0  # both tasks' test sets are balanced between their two labels


def at_chance(values: List[float], sizes: Dict[str, int]) -> bool:
    """A cell whose mean lies within two binomial standard errors (of the domain average, at
    that accuracy) of chance: a constant guess would score as well."""
    se = binomial_se({d: float(np.mean(values)) for d in sizes}, sizes)
    return se is not None and float(np.mean(values)) - CHANCE < 2 * se


def training_steps(root: str, task: str) -> Dict[str, List[int]]:
    """{method: the distinct --max_steps of its finished runs under ``root``} (config.json;
    runs whose length the epochs set are left out)."""
    found: Dict[str, set] = {}
    for label, run in finished_runs(root, task):
        config = utils.read_json(os.path.join(run, "config.json"), None) or {}
        steps = config.get("args", {}).get("max_steps")
        if steps:
            found.setdefault(label, set()).add(int(steps))
    return {label: sorted(steps) for label, steps in found.items()}


def steps_footer(root: str, task: str) -> str:
    """Each few-shot method's training steps per ratio, from the runs themselves: the length a
    cell was made with (two figures in one cell would say its runs differ)."""
    per_method: Dict[str, List[str]] = {}
    folders = fewshot_ratio_dirs(root)
    by_ratio = [training_steps(folder, task) for folder in folders]
    for label, _, _ in METHODS:
        if any(label in steps for steps in by_ratio):
            per_method[label] = [", ".join(map(str, steps.get(label, []))) or "-"
                                 for steps in by_ratio]
    if not per_method:
        return ""
    ratios = " / ".join(ratio_label(folder) for folder in folders)
    lines = [f"- {label}: {' / '.join(cells)}" for label, cells in per_method.items()]
    return (f"\nTraining steps of each method's runs at {ratios} (config.json):\n\n"
            + "\n".join(lines) + "\n")


def fewshot_table(root: str, task: str):
    """Rows: training-data ratios; columns: methods (average test accuracy over domains); the
    footer gives the test sets' binomial error and marks the cells at chance."""
    results = fewshot_results(root, task)
    if not results:
        return None
    sizes = test_set_sizes(os.path.join(root, "fewshot"), task)
    methods = [label for label, _, _ in METHODS if any(label in r for r in results.values())]
    header = ["Training data"] + methods
    # while a study is under way its cells can hold different numbers of seeds: say how many
    uneven = len({len(v) for by in results.values() for v in by.values() if len(v) > 1}) > 1
    rows, chance = [], 0
    for percent, by_method in results.items():
        row = [f"{percent:g}%"]
        for method in methods:
            values = by_method.get(method, [])
            flagged = bool(values) and at_chance(values, sizes)
            chance += flagged
            seeds = f" [{len(values)}]" if uneven and len(values) > 1 else ""
            row.append(format_cell(values) + seeds + (" †" if flagged else ""))
        rows.append(row)
    footer = "\n[n]: the number of seeds of a cell (the cells differ in it).\n" if uneven else ""
    if sizes:
        typical = binomial_se({d: 75.0 for d in sizes}, sizes)
        footer += (f"\nBinomial standard error of one run's average over the {sum(sizes.values())} "
                  f"test reviews: about ±{typical:.1f} points at 75% (± is the spread over "
                  f"seeds). † within two such errors of chance ({CHANCE:g}%): "
                  f"{utils.plural(chance, 'cell')}.\n")
    footer += steps_footer(root, task)
    footer += hardware_footer(root, task, fewshot_ratio_dirs(root))
    return header, rows, footer


def plot_fewshot(root: str, task: str, out_path: str) -> bool:
    """Average test accuracy against the share of training data, one line per method (mean
    over seeds, bars: std), the full data at 100%."""
    results = fewshot_results(root, task)
    if not results:
        return False
    full = {label: average_over_domains(cells) for label, cells in collect(root, task).items()}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for label, _, _ in METHODS:
        points = sorted((p, v) for p, by in results.items() for m, v in by.items() if m == label)
        if not points:
            continue
        if full.get(label):
            points.append((100.0, full[label]))
        x = [p for p, _ in points]
        axis.errorbar(x, [np.mean(v) for _, v in points],
                      yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in points],
                      marker="o", capsize=3, label=label)
    axis.set_xscale("log")
    axis.set_xticks(sorted({p for p in results} | {100.0}))
    axis.set_xticklabels([f"{p:g}%" for p in sorted({p for p in results} | {100.0})])
    axis.axhline(50.0, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("training data (share of the training split)")
    axis.set_ylabel("test accuracy (%), average over domains")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True


def method_of(run_dir: str, root: str, task: str) -> Optional[str]:
    """The METHODS row a run directory belongs to (by its path under ``root``)."""
    relative = os.path.relpath(run_dir, root).replace(os.sep, "/")
    for label, template, _ in METHODS:
        pattern = re.escape(template).replace(re.escape("{task}"), re.escape(task)).replace(
            re.escape("{domain}"), "[^/]+")
        if re.fullmatch(pattern + r"(/seed[^/]+)?", relative):
            return label
    return None


# Deployed forms (deploy_eval.py) in the order a reader compares them.
FORM_LABELS = {"torch_fp32": "PyTorch fp32", "torch_bf16": "PyTorch bf16",
               "onnx_fp32": "ONNX Runtime fp32", "onnx_int8": "ONNX Runtime int8"}


def deployments(root: str, task: str) -> List[dict]:
    """Every deployment.json under ``root`` with its method and seed; the per-domain runs of
    a single-domain method (one run a domain) are merged into one model per seed: accuracy
    of each domain from its own run, latency and size averaged over them."""
    merged: Dict[Tuple[str, str], dict] = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "deployment.json"), recursive=True)):
        run_dir = os.path.dirname(path)
        label = method_of(run_dir, root, task)
        if label is None:
            continue
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("task") != task:
            continue
        seed = os.path.basename(run_dir)
        into = merged.setdefault((label, seed), {"method": label, "seed": seed, "runs": [],
                                                 "forms": {}, "int8_minus_fp32_points": {}})
        into["runs"].append(os.path.relpath(run_dir, root))
        into["int8_minus_fp32_points"].update(record.get("int8_minus_fp32_points", {}))
        for form, entry in record["forms"].items():
            target = into["forms"].setdefault(form, {"accuracy": {}, "latency": [], "p90": [],
                                                     "size": []})
            target["accuracy"].update(entry["accuracy"])
            target["latency"].append(entry["batch1"]["median_ms"])
            target["p90"].append(entry["batch1"]["p90_ms"])
            target["size"].append(entry["size_mb"])
    found = []
    for record in merged.values():
        for entry in record["forms"].values():
            entry.update(mean=float(np.mean(list(entry["accuracy"].values()))),
                         batch1={"median_ms": float(np.mean(entry.pop("latency"))),
                                 "p90_ms": float(np.mean(entry.pop("p90")))},
                         size_mb=float(np.mean(entry.pop("size"))))
        record["name"] = (record["runs"][0] if len(record["runs"]) == 1 else
                          f"{record['method']} ({record['seed']}, {len(record['runs'])} runs)")
        found.append(record)
    return found


def tradeoff_rows(root: str, task: str):
    """Per run and deployed form: mean test accuracy, batch-1 latency, size, and for int8 its
    largest drop against fp32 on any domain."""
    header = ["Run", "Form", "mean test accuracy (%)", "batch-1 latency (ms, median / p90)",
              "size (MiB)", "int8 - fp32, worst domain (points)"]
    rows = []
    for record in deployments(root, task):
        for form, label in FORM_LABELS.items():
            entry = record["forms"].get(form)
            if entry is None:
                continue
            worst = "-"
            if form == "onnx_int8":
                worst = f"{min(record['int8_minus_fp32_points'].values()):+.1f}"
            rows.append([record["name"], label, f"{100 * entry['mean']:.1f}",
                         f"{entry['batch1']['median_ms']:.2f} / {entry['batch1']['p90_ms']:.2f}",
                         f"{entry['size_mb']:.1f}", worst])
    return header, rows


def plot_tradeoff(root: str, task: str, out_path: str) -> bool:
    """Test accuracy against batch-1 latency (left) and size on disk (right): one marker per
    deployed form, one colour per run."""
    records = deployments(root, task)
    if not records:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    markers = {"torch_fp32": "o", "torch_bf16": "s", "onnx_fp32": "^", "onnx_int8": "v"}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for index, record in enumerate(records):
        colour = f"C{index % 10}"
        for form, entry in record["forms"].items():
            accuracy = 100 * entry["mean"]
            axes[0].scatter(entry["batch1"]["median_ms"], accuracy, color=colour,
                            marker=markers.get(form, "x"))
            axes[1].scatter(entry["size_mb"], accuracy, color=colour,
                            marker=markers.get(form, "x"))
        axes[0].scatter([], [], color=colour, label=f"{record['method']} ({record['seed']})")
    for form, marker in markers.items():
        axes[1].scatter([], [], color="grey", marker=marker, label=FORM_LABELS[form])
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    axes[0].set_xlabel("batch-1 latency (ms, median; log scale)")
    axes[1].set_xlabel("size on disk (MiB; log scale)")
    axes[0].set_ylabel("test accuracy (%), mean over domains")
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True


def read_weight_records(run_dir: str) -> List[dict]:
    """domain_weights.jsonl, one record per evaluation step (a resumed run may have written a
    step twice: the later record wins), in step order."""
    path = os.path.join(run_dir, "domain_weights.jsonl")
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_domain_weights(run_dir: str, out_path: str, domains: List[str]) -> bool:
    """Domain weights w[l, d] over training, one panel per level, from domain_weights.jsonl."""
    records = read_weight_records(run_dir)
    if not records:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records]
    weights = np.array([r["weights"] for r in records])  # (evaluations, levels, domains)
    levels = weights.shape[1]
    figure, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 3), sharey=True, squeeze=False)
    for level in range(levels):
        axis = axes[0, level]
        for d, domain in enumerate(domains[:weights.shape[2]]):
            axis.plot(steps, weights[:, level, d], label=domain)
        axis.axhline(1.0 / weights.shape[2], color="grey", linestyle=":", linewidth=1)
        axis.set_title("embeddings" if level == 0 else f"student layer {level}")
        axis.set_xlabel("step")
    axes[0, 0].set_ylabel("domain weight")
    axes[0, -1].legend(fontsize=7)
    figure.suptitle(os.path.relpath(run_dir), fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True


def weight_summary(run_dir: str, domains: List[str]) -> Optional[Tuple[list, list]]:
    """Mean and spread (std over evaluations) of each domain's weight, averaged over levels."""
    records = read_weight_records(run_dir)
    if not records:
        return None
    weights = np.array([record["weights"] for record in records])
    return weights.mean(axis=(0, 1)).tolist(), weights.std(axis=0).mean(axis=0).tolist()


def study_runs(root: str, task: str, unreliable: str) -> List[dict]:
    """Every finished stage-4 run: its method, seed, the weight it gave the unreliable domain
    (mean over evaluations and levels, and at the last evaluation) and its test accuracies."""
    domains = task_domains(root, task)
    index = domains.index(unreliable)
    runs = []
    for label, template, per_domain in METHODS:
        if per_domain or not template.startswith("finetune_multi_domain"):
            continue
        for run_dir in seed_dirs(os.path.join(root, template.format(task=task, domain=""))):
            accuracy = {d: _test_accuracy(run_dir, d) for d in domains}
            if any(v is None for v in accuracy.values()):
                continue
            records = read_weight_records(run_dir)
            weights = np.array([r["weights"] for r in records]) if records else None
            runs.append({
                "method": label, "seed": os.path.basename(run_dir), "accuracy": accuracy,
                "weight_mean": None if weights is None else float(weights[:, :, index].mean()),
                "weight_last": None if weights is None else float(weights[-1, :, index].mean()),
                "others_mean": float(np.mean([accuracy[d] for d in domains if d != unreliable]))})
    return runs


def study_table(root: str, task: str, unreliable: str):
    """Per stage-4 run: the weight it gave the unreliable domain, and test accuracy elsewhere."""
    domains = task_domains(root, task)
    others = [d for d in domains if d != unreliable]
    header = (["Run", f"w[{unreliable}] mean", f"w[{unreliable}] last", "1/D"]
              + [f"test {d}" for d in others] + ["test mean (others)", f"test {unreliable}"])
    rows = []
    for run in study_runs(root, task, unreliable):
        weight = [("-" if run[k] is None else f"{run[k]:.4f}")
                  for k in ("weight_mean", "weight_last")]
        rows.append([f"{run['method']} ({run['seed']})", *weight, f"{1 / len(domains):.4f}"]
                    + [f"{run['accuracy'][d]:.1f}" for d in others]
                    + [f"{run['others_mean']:.1f}", f"{run['accuracy'][unreliable]:.1f}"])
    return header, rows


def study_summary(root: str, task: str, unreliable: str):
    """Per method, over its seeds: the unreliable domain's mean weight, and the test accuracy on
    the other domains and on it (mean ± std; * marks a single seed)."""
    runs = study_runs(root, task, unreliable)
    header = ["Method", "seeds", f"w[{unreliable}] (1/D = {1 / len(task_domains(root, task)):.3f})",
              "test mean (others)", f"test {unreliable}"]
    rows = []
    for label in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == label]
        weights = [run["weight_mean"] for run in mine if run["weight_mean"] is not None]
        weight = "-"
        if weights:
            weight = (f"{weights[0]:.3f}*" if len(weights) == 1 else
                      f"{np.mean(weights):.3f} ± {np.std(weights, ddof=1):.3f}")
        rows.append([label, str(len(mine)), weight,
                     format_cell([run["others_mean"] for run in mine]),
                     format_cell([run["accuracy"][unreliable] for run in mine])])
    return header, rows


def incomplete_runs(root: str) -> List[List[str]]:
    """[run directory, how far it got] of every run under ``root`` that has not said it
    finished (stopped, killed, still running): they are in no table."""
    rows = []
    for folder, subfolders, files in os.walk(root):
        if "results.json" in files or "last_checkpoint.pt" in files:
            subfolders[:] = []
            # a dev-only run (a tuning run: DO_TEST=0) is finished without a test
            config = utils.read_json(os.path.join(folder, "config.json"), {}) or {}
            status = utils.run_status(folder, need_test=config.get("args", {}).get("do_test",
                                                                                  True))
            if status["state"] != "finished":
                rows.append([os.path.relpath(folder, root), utils.describe_status(status)])
    return sorted(rows)


def report(root: str, out_dir: str, tasks: List[str]) -> str:
    printed = []
    unfinished = incomplete_runs(root)
    if unfinished:
        printed.append(write_table(out_dir, "incomplete_runs", ["Run", "State"], unfinished,
                                   "runs left out: not finished (resume them with "
                                   "--resume or SKIP_FINISHED=1)"))
    for task in tasks:
        domains = task_domains(root, task)
        table = collect(root, task)
        # a study of the few-shot ratios alone still gets its tables
        if any(any(cells.values()) for cells in table.values()):
            header, rows = table_rows(table, domains)
            printed.append(write_table(out_dir, f"results_{task}", header, rows,
                                       f"{task}: test accuracy (%)", hardware_footer(root, task)))
        comparisons = comparison_rows(root, task)
        if comparisons[1]:
            printed.append(write_table(out_dir, f"comparisons_{task}", *comparisons,
                                       f"{task}: differences of average test accuracy "
                                       f"(points), paired by seed"))
        fewshot = fewshot_table(root, task)
        if fewshot:
            header, rows, footer = fewshot
            printed.append(write_table(out_dir, f"fewshot_{task}", header, rows,
                                       f"{task}: few-shot, average test accuracy (%)", footer))
            plot_fewshot(root, task, os.path.join(out_dir, f"fewshot_{task}.png"))
            pairs = fewshot_comparison_rows(root, task)
            if pairs[1]:
                printed.append(write_table(out_dir, f"fewshot_comparisons_{task}", *pairs,
                                           f"{task}: few-shot, differences of average test "
                                           f"accuracy (points), paired by seed"))
        tradeoff = tradeoff_rows(root, task)
        if tradeoff[1]:
            printed.append(write_table(out_dir, f"tradeoff_{task}", *tradeoff,
                                       f"{task}: deployed forms, accuracy against speed and "
                                       f"size (deploy_eval.py)"))
            plot_tradeoff(root, task, os.path.join(out_dir, f"tradeoff_{task}.png"))
        weight_rows = []
        for label, template, per_domain in METHODS:
            if per_domain or not template.startswith("finetune_multi_domain"):
                continue
            variant = template.rsplit("/", 1)[-1]
            for run_dir in seed_dirs(os.path.join(root, template.format(task=task, domain=""))):
                name = f"domain_weights_{task}_{variant}_{os.path.basename(run_dir)}.png"
                plot_domain_weights(run_dir, os.path.join(out_dir, name), domains)
                summary = weight_summary(run_dir, domains)
                if summary:
                    mean, spread = summary
                    weight_rows.append([f"{label} ({os.path.basename(run_dir)})"] +
                                       [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, spread)])
        if weight_rows:
            printed.append(write_table(out_dir, f"domain_weights_{task}", ["Run"] + domains,
                                       weight_rows, f"{task}: domain weight, mean ± spread "
                                       f"over training (averaged over levels)"))
    return "\n".join(printed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Tables and plots from run directories.",
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("--runs", default="runs", help="the runs root the .sh files write")
    parser.add_argument("--out", default=None, help="default: <runs>/report")
    parser.add_argument("--tasks", nargs="+", default=list(PROCESSORS), choices=list(PROCESSORS))
    parser.add_argument("--study_domain", default=None,
                        help="also tabulate the weight each stage-4 run gave this (unreliable) "
                             "domain and the test accuracy on the others")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs):
        print(f"error: {args.runs}: runs directory not found", file=sys.stderr)
        return 1
    out_dir = args.out or os.path.join(args.runs, "report")
    text = report(args.runs, out_dir, args.tasks)
    if args.study_domain:
        for task in args.tasks:
            if args.study_domain in task_domains(args.runs, task):
                title = f"{task}: the unreliable domain '{args.study_domain}'"
                text += "\n" + write_table(out_dir, f"study_{task}",
                                           *study_table(args.runs, task, args.study_domain),
                                           title + ", every run")
                text += "\n" + write_table(out_dir, f"study_summary_{task}",
                                           *study_summary(args.runs, task, args.study_domain),
                                           title + ", mean ± std over seeds")
    print(text if text else f"no finished runs under {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
