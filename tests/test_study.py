"""The real study's rows and tools (issue 22): the mix teacher, the students on the labels
alone, the paired comparisons with the binomial error, the few-shot plot, the plan of what is
left, and the launchers' switches for them."""
import datetime
import json
import os
import subprocess

import pytest
import torch

import finetune_multi_domain
import plan
import report
import train_multi_domain
from conftest import ROOT, tiny_teacher_args
from objectives import build_student, build_teacher

DOMAINS = ["books", "dvd", "electronics", "kitchen"]


# The no-distillation baseline is the student's model trained on the labels ----------------
def test_labels_only_model_is_the_students_architecture_and_start(minilm_dir):
    teacher = build_teacher(None, minilm_dir, 30522, 2, 128)
    student = build_student(None, minilm_dir, [1, 2], 30522, 2, teacher.config, 128)
    alone = build_teacher(None, minilm_dir, 30522, 2, 128, blocks=[1, 2])
    assert alone.config.num_hidden_layers == 2
    own, reference = alone.state_dict(), student.state_dict()
    encoder = [name for name in own if name.startswith(("encoder.", "embeddings."))]
    assert encoder and all(torch.equal(own[n], reference[n]) for n in encoder)
    # block 2 of the checkpoint is the model's second block, not the teacher's second
    assert torch.equal(own["encoder.1.attention.query.weight"],
                       teacher.state_dict()["encoder.1.attention.query.weight"])
    assert not torch.equal(own["encoder.1.attention.query.weight"],
                           teacher.state_dict()["encoder.2.attention.query.weight"])


def test_init_layers_needs_a_checkpoint(sample, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_teacher_args(sample, out, 2, "--do_train", "--init_layers", "1")
    assert train_multi_domain.main(args) == 1
    assert "--init_layers needs --init_checkpoint" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def pooled_teacher(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "train_pooled"
    args = tiny_teacher_args(sample, out, 2, "--do_train", "--do_test", "--pooled")
    assert train_multi_domain.main(args) == 0
    return out


def test_pooled_teacher_has_one_head_and_tests_every_domain(pooled_teacher):
    saved = torch.load(pooled_teacher / "best_model_dvd.bin", weights_only=True)
    names = saved["state_dict"]
    assert any(k.startswith("classifier.") for k in names)
    assert not any(k.startswith("classifiers.") for k in names)
    test = json.load(open(pooled_teacher / "results.json"))["test"]
    assert sorted(test["per_domain"]) == DOMAINS
    assert sorted(test["examples_per_domain"]) == DOMAINS
    assert all(n > 0 for n in test["examples_per_domain"].values())


def test_a_pooled_teacher_can_be_distilled(sample, pooled_teacher, tmp_path):
    out = tmp_path / "student"
    args = ["--task", "amazon", "--data_dir", sample["amazon"], "--teacher_dir",
            str(pooled_teacher), "--student_config", "tiny_student", "--max_seq_length", "32",
            "--batch_size", "4", "--max_steps", "2", "--val_freq", "2", "--no_progress",
            "--do_train", "--do_test", "--output_dir", str(out)]
    assert finetune_multi_domain.main(args) == 0
    assert json.load(open(out / "results.json"))["finished"]["tested"]


def dry_run(script, tmp_path, **env):
    result = subprocess.run(["bash", script], capture_output=True, text=True, cwd=ROOT,
                            timeout=60, env=dict(os.environ, PYTHON="echo", TASKS="amazon",
                                                 AMAZON_DIR=str(tmp_path),
                                                 OUT_ROOT=str(tmp_path / "runs"), **env))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_launcher_switches_write_where_report_reads(tmp_path):
    (tmp_path / "books").mkdir()
    single = dry_run("finetune_domain.sh", tmp_path, DISTILL="0", PRESET="real")
    assert single.startswith("train_domain.py") and "--init_layers 1 2" in single
    assert "--learning_rate 1e-3" in single and "--teacher_dir" not in single
    multi = dry_run("finetune_multi_domain.sh", tmp_path, DISTILL="0", PRESET="real")
    assert multi.startswith("train_multi_domain.py") and "--init_layers 1 2" in multi
    pooled = dry_run("train_multi_domain.sh", tmp_path, POOLED="1", PRESET="real")
    assert "--pooled" in pooled
    fewshot = dry_run("train_domain.sh", tmp_path, MODE="fewshot", FEWSHOT_PERCENTS="2",
                      FEWSHOT_STEPS="80")
    assert "--max_steps 80" in fewshot and "--train_ratio 0.018" in fewshot
    templates = {label: t for label, t, _ in report.METHODS}
    for text, label in ((single, report.LABELS_ONLY_SINGLE), (multi, report.LABELS_ONLY_MULTI),
                        (pooled, "Mix teacher (pooled domains, one head)")):
        folder = templates[label].format(task="amazon", domain="{domain}")
        assert f"runs/{folder}/seed42" in text


def test_fewshot_steps_per_ratio(tmp_path):
    (tmp_path / "books").mkdir()
    text = dry_run("train_domain.sh", tmp_path, MODE="fewshot", FEWSHOT_PERCENTS="2 20",
                   FEWSHOT_STEPS="20:100 2:30")
    steps = {line.split()[line.split().index("--train_ratio") + 1]:
             line.split()[line.split().index("--max_steps") + 1]
             for line in text.splitlines() if line.startswith("train_domain.py")}
    assert steps == {"0.018": "30", "0.18": "100"}


@pytest.mark.parametrize("steps, message", [
    ("2:30", 'FEWSHOT_STEPS="2:30" has no PERCENT:STEPS pair for 20%'),
    ("2:30 20:1e2", "steps must be a positive integer, got '1e2'"),
    ("0", "steps must be a positive integer, got '0'")])
def test_bad_fewshot_steps_stop_before_any_run(tmp_path, steps, message):
    (tmp_path / "books").mkdir()
    result = subprocess.run(
        ["bash", "train_domain.sh"], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=dict(os.environ, PYTHON="echo", TASKS="amazon", AMAZON_DIR=str(tmp_path),
                 OUT_ROOT=str(tmp_path / "runs"), MODE="fewshot", FEWSHOT_PERCENTS="2 20",
                 FEWSHOT_STEPS=steps))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()  # one line, naming the variable
    assert len(lines) == 1 and lines[0].startswith("error: FEWSHOT_STEPS=") and message in lines[0]
    assert "train_domain.py" not in result.stdout and not (tmp_path / "runs").exists()


# report.py: the rows, the paired comparisons, the binomial error, the few-shot plot ----------
def write_run(path, accuracy, examples=200):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "results.json"), "w") as handle:
        json.dump({"test": {"per_domain": {d: accuracy for d in DOMAINS},
                            "examples_per_domain": {d: examples for d in DOMAINS}},
                   "finished": {"train_steps": 10, "tested": True}}, handle)


def test_report_pairs_seeds_and_gives_the_binomial_error(tmp_path):
    # HRKD beats multi-domain KD by 1, 2 and 3 points on seeds 42-44; the labels-only student
    # ties TinyBERT-KD exactly on two seeds.
    for seed, (hrkd, no_graph) in zip((42, 43, 44), ((0.81, 0.80), (0.82, 0.80), (0.83, 0.80))):
        write_run(tmp_path / f"finetune_multi_domain/amazon/hrkd/seed{seed}", hrkd)
        write_run(tmp_path / f"finetune_multi_domain/amazon/no_graph/seed{seed}", no_graph)
    for seed in (42, 43):
        for domain in DOMAINS:
            write_run(tmp_path / f"finetune_domain/amazon/{domain}/seed{seed}", 0.8)
            write_run(tmp_path / f"labels_only_domain/amazon/{domain}/seed{seed}", 0.8)
    write_run(tmp_path / "train_pooled/amazon/seed42", 0.9)
    text = report.report(str(tmp_path), str(tmp_path / "out"), ["amazon"])
    assert "| Mix teacher (pooled domains, one head) | 90.0* |" in text
    rows = {r[0]: r for r in report.comparison_rows(str(tmp_path), "amazon")[1]}
    hrkd = rows["HRKD vs Multi-domain KD (no graph)"]
    # differences 1, 2, 3: mean 2, std 1; t = 2 / (1 / sqrt 3) = 3.46 with 2 degrees of
    # freedom: two-sided p = 0.074
    assert hrkd[1:5] == ["3", "+1.0 +2.0 +3.0", "+2.0 ± 1.0", "0.074"]
    # sqrt(4 x 0.81 x 0.19 / 200) / 4 = 1.39 points (seed 42's accuracy, 200 reviews a domain)
    assert hrkd[5] == "1.4" and hrkd[6] == "inside the seed spread"
    tie = rows[f"TinyBERT-KD vs {report.LABELS_ONLY_SINGLE}"]
    assert tie[1:5] == ["2", "+0.0 +0.0", "+0.0 ± 0.0", "1.000"]
    # only the seeds both ran are paired (TinyBERT-KD has 42 and 43)
    assert rows["HRKD vs TinyBERT-KD"][1:3] == ["2", "+1.0 +2.0"]
    assert (tmp_path / "out" / "comparisons_amazon.md").is_file()


def test_report_a_consistent_gain_is_named(tmp_path):
    for seed, (hrkd, other) in zip((42, 43, 44), ((0.84, 0.80), (0.85, 0.80), (0.84, 0.80))):
        write_run(tmp_path / f"finetune_multi_domain/amazon/hrkd/seed{seed}", hrkd)
        write_run(tmp_path / f"finetune_multi_domain/amazon/uniform/seed{seed}", other)
    rows = {r[0]: r for r in report.comparison_rows(str(tmp_path), "amazon")[1]}
    assert rows["HRKD vs HRKD (uniform weights)"][6] == "HRKD better (p < 0.05)"


def test_fewshot_plot_has_a_line_per_method(tmp_path):
    for percent, value in (("2", 0.6), ("10", 0.7)):
        for seed in (42, 43):
            write_run(tmp_path / f"fewshot/p{percent}/finetune_multi_domain/amazon/hrkd/seed{seed}",
                      value + 0.01 * (seed - 42))
    write_run(tmp_path / "finetune_multi_domain/amazon/hrkd/seed42", 0.8)
    report.report(str(tmp_path), str(tmp_path / "out"), ["amazon"])
    assert (tmp_path / "out" / "fewshot_amazon.png").stat().st_size > 1000
    table = (tmp_path / "out" / "fewshot_amazon.md").read_text()
    assert "| 2% | 60.5 ± 0.7 |" in table and "| 10% | 70.5 ± 0.7 |" in table



def test_fewshot_table_marks_the_cells_at_chance(tmp_path):
    for percent, value in (("2", 0.52), ("10", 0.60)):
        for domain in DOMAINS:
            for seed in (42, 43):
                write_run(tmp_path / f"fewshot/p{percent}/train_domain/amazon/{domain}/"
                                     f"seed{seed}", value)
    header, rows, footer = report.fewshot_table(str(tmp_path), "amazon")
    # 4 x 200 test reviews: a binomial error of 1.8 points at 52%, so 52% is chance, 60% not
    assert rows == [["2%", "52.0 ± 0.0 †"], ["10%", "60.0 ± 0.0"]]
    assert "over the 800 test reviews: about ±1.5 points at 75%" in footer
    assert "within two such errors of chance (50%): 1 cell." in footer
    assert "[n]" not in footer  # every cell has the same seeds
    for domain in DOMAINS:
        write_run(tmp_path / f"fewshot/p10/train_domain/amazon/{domain}/seed44", 0.63)
    _, rows, footer = report.fewshot_table(str(tmp_path), "amazon")
    assert rows == [["2%", "52.0 ± 0.0 [2] †"], ["10%", "61.0 ± 1.7 [3]"]]
    assert "[n]: the number of seeds of a cell (the cells differ in it)." in footer

def test_fewshot_comparisons_pair_seeds_at_each_ratio(tmp_path):
    # at 2% HRKD beats multi-domain KD by 2, 3 and 4 points (p = 0.035); at 10% they trade places
    for percent, pairs in (("2", ((0.62, 0.60), (0.63, 0.60), (0.64, 0.60))),
                           ("10", ((0.71, 0.70), (0.70, 0.71), (0.70, 0.70)))):
        for seed, (hrkd, no_graph) in zip((42, 43, 44), pairs):
            base = tmp_path / f"fewshot/p{percent}/finetune_multi_domain/amazon"
            write_run(base / f"hrkd/seed{seed}", hrkd)
            write_run(base / f"no_graph/seed{seed}", no_graph)
    header, rows = report.fewshot_comparison_rows(str(tmp_path), "amazon")
    assert header[:2] == ["Training data", "Comparison"]
    assert [row[:5] for row in rows] == [
        ["2%", "HRKD vs Multi-domain KD (no graph)", "3", "+2.0 +3.0 +4.0", "+3.0 ± 1.0"],
        ["10%", "HRKD vs Multi-domain KD (no graph)", "3", "+1.0 -1.0 +0.0", "+0.0 ± 1.0"]]
    assert rows[0][-1] == "HRKD better (p < 0.05)" and rows[1][-1] == "inside the seed spread"
    # a study of the few-shot ratios alone gets its tables, and another task none
    report.report(str(tmp_path), str(tmp_path / "out"), ["amazon", "mnli"])
    assert "| 2% | HRKD vs Multi-domain KD (no graph) | 3 |" in (
        tmp_path / "out" / "fewshot_comparisons_amazon.md").read_text()
    assert (tmp_path / "out" / "fewshot_amazon.md").is_file()
    assert not list((tmp_path / "out").glob("*mnli*"))


def test_fewshot_footer_gives_each_methods_steps_per_ratio(tmp_path):
    for percent, teacher_steps, student_steps in (("2", 30, 30), ("20", 100, None)):
        for domain in DOMAINS:
            for seed, steps in ((42, teacher_steps), (43, 60)):
                run = tmp_path / f"fewshot/p{percent}/train_domain/amazon/{domain}/seed{seed}"
                write_run(run, 0.7)
                (run / "config.json").write_text(json.dumps({"args": {"max_steps": steps}}))
            if student_steps:
                run = tmp_path / f"fewshot/p{percent}/finetune_domain/amazon/{domain}/seed42"
                write_run(run, 0.6)
                (run / "config.json").write_text(json.dumps({"args": {"max_steps": 30}}))
    _, _, footer = report.fewshot_table(str(tmp_path), "amazon")
    # seeds trained to other lengths show as two figures in one cell
    assert "Training steps of each method's runs at 2% / 20% (config.json):" in footer
    assert "- Single-domain teacher: 30, 60 / 60, 100\n- TinyBERT-KD: 30 / -\n" in footer


# plan.py: what is left, and how long it takes at the pace of the finished runs --------------
def test_plan_counts_what_is_left_and_estimates_it(tmp_path):
    done = tmp_path / "train_domain/amazon/books/seed42"
    done.mkdir(parents=True)
    (done / "config.json").write_text(json.dumps({
        "command": ["train_domain.py"], "started": "2026-12-01T10:00:00",
        "args": {"max_seq_length": 32, "train_ratio": 0.9, "num_train_epochs": 2,
                 "max_steps": 0}}))
    (done / "results.json").write_text(json.dumps({"finished": {
        "train_steps": 60, "tested": True}}))
    finished_at = datetime.datetime(2026, 12, 1, 10, 3).timestamp()  # 180 s: 3 s a step
    os.utime(done / "results.json", (finished_at, finished_at))
    lines = ["== stage 1: teachers (2026-12-02 01:00:00)",
             f"train_domain.py --domain books dvd kitchen --max_seq_length 32 --train_ratio 0.9 "
             f"--num_train_epochs 2 --output_dir {tmp_path}/train_domain/amazon/{{domain}}/seed42",
             f"train_domain.py --domain books --max_seq_length 32 --train_ratio 0.09 "
             f"--num_train_epochs 4 --output_dir {tmp_path}/fewshot/p10/train_domain/amazon/"
             f"{{domain}}/seed42",
             "== stage 4: students (2026-12-02 01:00:00)",
             f"finetune_multi_domain.py --max_seq_length 32 --variant hrkd uniform "
             f"--output_dir {tmp_path}/finetune_multi_domain/amazon/{{variant}}/seed42"]
    text, seconds, unknown = plan.summarise(plan.parse_commands(lines), str(tmp_path))
    # dvd and kitchen: 60 steps x 3 s each; the 10% run: 60 x 4/2 x 0.1 = 12 steps x 3 s
    assert seconds == pytest.approx(2 * 180 + 36)
    assert unknown == 2  # no stage-4 run has finished: no pace to go by
    assert "stage 1: teachers: 1 of 4 runs finished, 3 left, about 7 min" in text
    assert "stage 4: students: 0 of 2 runs finished, 2 left (2 without an estimate" in text


def test_plan_names_the_step_of_a_stopped_run_without_a_total_it_does_not_know(tmp_path):
    """A run stopped before its first evaluation has a resume step but no recorded total."""
    early = tmp_path / "finetune_multi_domain/mnli/uniform/seed42"
    early.mkdir(parents=True)
    (early / "results.json").write_text(json.dumps({"resume_step": 19}))
    later = tmp_path / "finetune_multi_domain/mnli/no_graph/seed42"
    later.mkdir(parents=True)
    (later / "results.json").write_text(json.dumps({
        "resume_step": 150, "dev": {"last_step": 150, "total_steps": 1210}}))
    lines = [f"finetune_multi_domain.py --variant uniform no_graph --output_dir "
             f"{tmp_path}/finetune_multi_domain/mnli/{{variant}}/seed42"]
    text, _, _ = plan.summarise(plan.parse_commands(lines), str(tmp_path))
    assert f"{early}: incomplete at step 19\n" in text + "\n" and "None" not in text
    assert f"{later}: incomplete at step 150 of 1210" in text


def _committed_run(folder, machine, seconds, steps=60, **args):
    """A finished stage-1 run as results/ holds it: no weights, its wall time in timing.json
    (the files' modification times are a clone's); ``args`` override its flags."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "command": ["train_domain.py"], "started": "2026-12-01T10:00:00", "machine": machine,
        "args": {"max_seq_length": 32, "train_ratio": 0.9, "num_train_epochs": 2, **args}}))
    (folder / "results.json").write_text(json.dumps({"finished": {"train_steps": steps,
                                                                  "tested": True}}))
    (folder / "timing.json").write_text(json.dumps({"seconds": seconds, "resumed": False,
                                                    "train_steps": steps, "machine": machine}))


def test_plan_takes_the_pace_of_committed_runs_of_this_machine(tmp_path):
    committed = tmp_path / "results"
    _committed_run(committed / "cpu/train_domain/amazon/books/seed42", "this CPU", 120)  # 2 s
    _committed_run(committed / "gpu/train_domain/amazon/books/seed42", "a GPU", 6)  # other
    lines = [f"train_domain.py --domain dvd --max_seq_length 32 --train_ratio 0.9 "
             f"--num_train_epochs 2 --output_dir {tmp_path}/runs/train_domain/amazon/"
             f"{{domain}}/seed42"]
    runs = str(tmp_path / "runs")
    _, seconds, unknown = plan.summarise(plan.parse_commands(lines), runs)
    assert (seconds, unknown) == (0, 1)  # nothing here, and no committed pace asked for
    text, seconds, unknown = plan.summarise(plan.parse_commands(lines), runs, (str(committed),),
                                            "this CPU")
    assert (seconds, unknown) == (pytest.approx(120), 0)  # 60 steps at the CPU's 2 s a step
    assert "1 run estimated from the pace of runs under" in text and "this CPU" in text
    # a copy without timing.json: its files' modification times are the clone's, not a pace
    timing = committed / "cpu/train_domain/amazon/books/seed42/timing.json"
    timing.unlink()
    assert plan.summarise(plan.parse_commands(lines), runs, (str(committed),),
                          "this CPU")[2] == 1
    # a resumed run's wall time includes its downtime: not a pace
    timing.write_text(json.dumps({"seconds": 120, "resumed": True}))
    assert plan.summarise(plan.parse_commands(lines), runs, (str(committed),),
                          "this CPU")[2] == 1


def test_plan_prefers_the_pace_of_this_machine_in_the_runs_folder(tmp_path):
    # a study's folder that moved between machines: a run there from a 2x slower machine is
    # the last resort, after the committed runs of this machine
    runs, committed = tmp_path / "runs", tmp_path / "results"
    _committed_run(runs / "train_domain/amazon/books/seed42", "slow CPU", 240)  # 4 s a step
    lines = [f"train_domain.py --domain dvd --max_seq_length 32 --train_ratio 0.9 "
             f"--num_train_epochs 2 --output_dir {runs}/train_domain/amazon/{{domain}}/seed42"]
    commands = plan.parse_commands(lines)
    text, seconds, unknown = plan.summarise(commands, str(runs), (str(committed),), "fast CPU")
    assert (seconds, unknown) == (pytest.approx(240), 0)  # nothing else to go by
    assert "1 run estimated from the pace of runs under" in text and "other machines: slow" in text
    _committed_run(committed / "train_domain/amazon/books/seed42", "fast CPU", 120)  # 2 s
    text, seconds, _ = plan.summarise(commands, str(runs), (str(committed),), "fast CPU")
    assert seconds == pytest.approx(120) and "other machines" not in text
    _committed_run(runs / "train_domain/amazon/kitchen/seed42", "fast CPU", 60)  # 1 s a step
    assert plan.summarise(commands, str(runs), (str(committed),), "fast CPU")[1] == \
        pytest.approx(60)
    # without --machine every run of the folder counts: (240 + 60) s over 120 steps
    assert plan.summarise(commands, str(runs))[1] == pytest.approx(150)


def test_finished_runs_record_their_wall_time_and_collect_keeps_it(tmp_path, pooled_teacher):
    import utils
    timing = json.load(open(pooled_teacher / "timing.json"))
    config = json.load(open(pooled_teacher / "config.json"))
    assert timing["seconds"] > 0 and timing["resumed"] is False
    assert timing["started"] == config["started"] and timing["machine"] == config["machine"]
    assert timing["train_steps"] == json.load(open(pooled_teacher / "results.json"))[
        "finished"]["train_steps"]
    utils.collect_finished(str(pooled_teacher.parent), str(tmp_path / "kept"))
    assert (tmp_path / "kept" / pooled_teacher.name / "timing.json").is_file()

def test_reproduce_left_prints_the_plan_and_creates_nothing(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(["bash", "reproduce_amazon.sh", "left"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, OUT_ROOT=str(out), SEEDS="42"))
    assert result.returncode == 0, result.stderr
    assert "-- table: what is left" in result.stdout and "-- fewshot" in result.stdout
    # one seed: 4 teachers, the stage-3 and the mix teacher, 4 + 4 single-domain students,
    # 4 stage-4 variants, the multi-domain student on the labels, the meta-teacher and its 4
    # Meta-KD students; the few-shot study's 4 ratios
    assert "stage 1: single-domain teachers: 0 of 4 runs finished" in result.stdout
    assert "stage 4: multi-domain students: 0 of 4 runs finished" in result.stdout
    assert "left: 24 runs" in result.stdout
    assert "Meta-KD stage B: the students of the meta-teacher: 0 of 4 runs finished" in \
        result.stdout
    assert "stage 4: multi-domain students: 0 of 8 runs finished" in result.stdout  # few-shot
    assert not out.exists()



def test_reproduce_left_counts_finished_stage4_variants(tmp_path):
    # stage 4 leaves finished variants out of its command when it skips them: the plan must
    # still count them as finished, not forget them
    out = tmp_path / "runs"
    run = out / "finetune_multi_domain/amazon/hrkd/seed42"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"finished": {"train_steps": 10,
                                                               "tested": True}}))
    result = subprocess.run(["bash", "reproduce_amazon.sh", "left"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, OUT_ROOT=str(out), SEEDS="42"))
    assert result.returncode == 0, result.stderr
    assert "stage 4: multi-domain students: 1 of 4 runs finished, 3 left" in result.stdout
    assert "left: 23 runs" in result.stdout


def test_reproduce_left_on_a_fresh_clone_goes_by_the_committed_runs_of_this_machine(tmp_path):
    import runtime
    machine = runtime.describe_machine(torch.device("cpu"))
    pace = tmp_path / "results"
    for seed in (42, 43):  # the table's stage-1 teachers ran here: 2 s a step
        run = pace / f"train_domain/amazon/books/seed{seed}"
        _committed_run(run, machine, 306, steps=153)
        config = json.loads((run / "config.json").read_text())
        config["args"].update(max_seq_length=128, num_train_epochs=3, task="amazon")
        (run / "config.json").write_text(json.dumps(config))
    result = subprocess.run(["bash", "reproduce_amazon.sh", "left"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300, env=dict(
                                os.environ, OUT_ROOT=str(tmp_path / "runs"), SEEDS="42",
                                PACE_FROM=str(pace)))
    assert result.returncode == 0, result.stderr
    # 4 teachers x 153 steps x 2 s
    assert "stage 1: single-domain teachers: 0 of 4 runs finished, 4 left, about 20 min" \
        in result.stdout
    assert f"estimated from the pace of runs under {pace} that ran on this kind of machine: " \
           f"{machine}" in result.stdout
    assert not (tmp_path / "runs").exists()

def test_report_says_on_which_hardware_each_row_ran(tmp_path):
    for seed, machine, amp in ((42, "NVIDIA H200 (GPU); torch 2.11", "bf16"),
                               (43, "AMD EPYC, 2 cores", "off"), (44, "AMD EPYC, 2 cores", "off")):
        run = tmp_path / f"finetune_multi_domain/amazon/hrkd/seed{seed}"
        write_run(run, 0.8)
        (run / "config.json").write_text(json.dumps({"machine": machine, "args": {"amp": amp}}))
        # wall times: 1 min on the GPU; on the CPU 62 min, and a resumed run that timed a part
        timing = {42: {"seconds": 61.0}, 43: {"seconds": 3720.0},
                  44: {"seconds": 200.0, "resumed": True}}[seed]
        (run / "timing.json").write_text(json.dumps(timing))
    write_run(tmp_path / "finetune_multi_domain/amazon/uniform/seed42", 0.8)  # older: none
    text = report.report(str(tmp_path), str(tmp_path / "out"), ["amazon"])
    assert ("- HRKD: NVIDIA H200 (GPU); torch 2.11; bf16 autocast (1 run; 1 min a run); "
            "AMD EPYC, 2 cores; fp32 (2 runs; 62 min a run, 1 timed)") in text
    assert "- HRKD (uniform weights): not recorded (1 run)" in text


def test_runs_record_their_machine(sample, pooled_teacher):
    config = json.load(open(pooled_teacher / "config.json"))
    assert "torch " in config["machine"] and ("cores" in config["machine"]
                                               or "GPU" in config["machine"])


def test_finished_tuning_runs_are_not_listed_as_incomplete(tmp_path):
    for name, do_test, tested in (("tune", False, False), ("table", True, False)):
        run = tmp_path / name / "train_domain/amazon/books/seed42"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"args": {"do_test": do_test}}))
        (run / "results.json").write_text(json.dumps({"finished": {"train_steps": 3,
                                                                   "tested": tested}}))
    assert [row[0] for row in report.incomplete_runs(str(tmp_path))] == [
        "table/train_domain/amazon/books/seed42"]


def test_collect_keeps_finished_tuning_runs(tmp_path):
    import utils
    for name, do_test, tested in (("tune", False, False), ("untested", True, False)):
        run = tmp_path / "runs" / name / "train_domain/amazon/books/seed42"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"args": {"do_test": do_test}}))
        (run / "results.json").write_text(json.dumps({"finished": {"train_steps": 3,
                                                                   "tested": tested}}))
    assert utils.collect_finished(str(tmp_path / "runs"), str(tmp_path / "kept")) == [
        "tune/train_domain/amazon/books/seed42"]


def test_plan_does_not_count_an_epoch_run_s_steps_from_a_max_steps_run(tmp_path):
    # 30 steps of 3 per epoch: 10 epochs, not 3
    _committed_run(tmp_path / "fewshot/p5/train_domain/amazon/books/seed42", None, 60, steps=30,
                   train_ratio=0.045, num_train_epochs=3, max_steps=30)
    lines = [f"train_domain.py --domain dvd --max_seq_length 32 --train_ratio 0.9 "
             f"--num_train_epochs 3 --output_dir {tmp_path}/train_domain/amazon/{{domain}}/seed42",
             f"train_domain.py --domain dvd --max_seq_length 32 --train_ratio 0.09 "
             f"--num_train_epochs 3 --max_steps 30 --output_dir {tmp_path}/fewshot/p10/"
             f"train_domain/amazon/{{domain}}/seed42"]
    _, seconds, unknown = plan.summarise(plan.parse_commands(lines), str(tmp_path))
    assert seconds == pytest.approx(60) and unknown == 1  # the 30-step run only: 2 s a step


def test_plan_does_not_time_a_students_model_at_a_teachers_pace(tmp_path):
    done = tmp_path / "train_domain/amazon/books/seed42"
    done.mkdir(parents=True)
    (done / "config.json").write_text(json.dumps({
        "command": ["train_domain.py"], "started": "2026-12-01T10:00:00",
        "args": {"max_seq_length": 32, "train_ratio": 0.9, "num_train_epochs": 2}}))
    (done / "results.json").write_text(json.dumps({"finished": {"train_steps": 60,
                                                                "tested": True}}))
    lines = [f"train_domain.py --domain dvd --max_seq_length 32 --init_layers 1 2 "
             f"--output_dir {tmp_path}/labels_only_domain/amazon/{{domain}}/seed42"]
    _, seconds, unknown = plan.summarise(plan.parse_commands(lines), str(tmp_path))
    assert seconds == 0 and unknown == 1



def test_plan_times_a_run_only_by_runs_of_its_task_and_batches(tmp_path):
    # an Amazon teacher's pace (padded reviews, 4 domains' epochs) is no MNLI teacher's
    committed = tmp_path / "results"
    _committed_run(committed / "train_domain/amazon/books/seed42", "this CPU", 120,
                   task="amazon")  # 2 s a step, padded
    lines = [f"train_domain.py --task mnli --domain fiction --max_seq_length 32 "
             f"--train_ratio 0.9 --num_train_epochs 2 --length_buckets --output_dir "
             f"{tmp_path}/runs/train_domain/mnli/{{domain}}/seed42"]
    commands = plan.parse_commands(lines)
    assert (commands[0].runs[0].task, commands[0].runs[0].buckets) == ("mnli", True)
    runs = str(tmp_path / "runs")
    text, seconds, unknown = plan.summarise(commands, runs, (str(committed),), "this CPU")
    assert (seconds, unknown) == (0, 1) and "without an estimate" in text
    # an MNLI run padded to the length: still not the pace of bucketed batches
    _committed_run(committed / "train_domain/mnli/slate/seed42", "this CPU", 240, task="mnli")
    assert plan.summarise(commands, runs, (str(committed),), "this CPU")[1:] == (0, 1)
    # a bucketed MNLI run of 30 steps in 30 s: 1 s a step over its 30 steps of two epochs
    _committed_run(committed / "train_domain/mnli/travel/seed42", "this CPU", 30, steps=30,
                   task="mnli", length_buckets=True)
    _, seconds, unknown = plan.summarise(commands, runs, (str(committed),), "this CPU")
    assert (seconds, unknown) == (pytest.approx(30), 0)

# The few-shot length, chosen on dev ----------------------------------------------------------
def test_tune_fewshot_dry_run_sweeps_steps_on_books_at_every_ratio(tmp_path):
    out = tmp_path / "runs"
    env = dict(os.environ, OUT_ROOT=str(out), PYTHON="echo")
    env.pop("FEWSHOT_PERCENTS", None)
    result = subprocess.run(["bash", "reproduce_amazon.sh", "tune_fewshot"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    commands = [line.split() for line in result.stdout.splitlines()
                if line.startswith(("train_domain.py", "finetune_domain.py"))]
    ratio = {"0.018": 2, "0.045": 5, "0.09": 10, "0.18": 20}
    assert [(c[0], ratio[c[c.index("--train_ratio") + 1]], c[c.index("--max_steps") + 1])
            for c in commands] == [
        (script, percent, steps) for percent in (2, 5, 10, 20)
        for script in ("train_domain.py", "finetune_domain.py") for steps in ("30", "100")]
    for command in commands:
        at = command.index("--domain")
        assert command[at + 1] == "books" and command[at + 2].startswith("--")  # books alone
        assert "--do_test" not in command  # dev only
        assert "/tune_fewshot/" in command[command.index("--output_dir") + 1]
    # each student distils the teacher linked into its own root
    student = commands[2]
    assert student[student.index("--teacher_dir") + 1].startswith(
        str(out / "tune_fewshot" / "student_steps30" / "fewshot" / "p2" / "train_domain"))
    assert not out.exists()


def test_real_preset_trains_every_fewshot_run_the_chosen_steps(tmp_path):
    env = dict(os.environ, OUT_ROOT=str(tmp_path / "runs"), PYTHON="echo", SEEDS="42")
    env.pop("FEWSHOT_STEPS", None)
    env.pop("FEWSHOT_PERCENTS", None)
    result = subprocess.run(["bash", "reproduce_amazon.sh", "fewshot"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    stages = [line.split() for line in result.stdout.splitlines() if "--max_steps" in line]
    assert len(stages) == 4 * 4
    ratio = {"0.018": 2, "0.045": 5, "0.09": 10, "0.18": 20}
    steps = {(c[0], ratio[c[c.index("--train_ratio") + 1]]): int(c[c.index("--max_steps") + 1])
             for c in stages}
    # each stage and ratio at the length chosen on dev (books' for stages 1-2, stage 3 taking
    # stage 1's; every domain's at 2% for stage 4)
    teachers = {2: 30, 5: 30, 10: 100, 20: 100}
    students = {2: 30, 5: 100, 10: 100, 20: 100}
    assert steps == {**{("train_domain.py", p): s for p, s in teachers.items()},
                     **{("train_multi_domain.py", p): s for p, s in teachers.items()},
                     **{("finetune_domain.py", p): s for p, s in students.items()},
                     **{("finetune_multi_domain.py", p): 100 for p in teachers}}


def test_tune_fewshot_multi_dry_run_sweeps_stage_4_steps_on_every_domain(tmp_path):
    out = tmp_path / "runs"
    env = dict(os.environ, OUT_ROOT=str(out), PYTHON="echo", TUNE_FEWSHOT_STEPS="30 100")
    env.pop("FEWSHOT_STEPS", None)
    result = subprocess.run(["bash", "reproduce_amazon.sh", "tune_fewshot_multi"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    commands = [line.split() for line in result.stdout.splitlines()
                if line.startswith(("train_multi_domain.py", "finetune_multi_domain.py"))]
    # one teacher at the preset's few-shot steps, then the students at each candidate
    assert [(c[0], c[c.index("--max_steps") + 1]) for c in commands] == [
        ("train_multi_domain.py", "30"), ("finetune_multi_domain.py", "30"),
        ("finetune_multi_domain.py", "100")]
    for command in commands:
        assert "--domain" not in command  # every domain
        assert command[command.index("--train_ratio") + 1] == "0.018"
        assert "--do_test" not in command
    student = commands[1]
    at = student.index("--variant")
    assert student[at + 1:at + 3] == ["hrkd", "no_graph"]
    assert student[student.index("--teacher_dir") + 1] == str(
        out / "tune_fewshot_multi" / "student_steps30" / "fewshot" / "p2" / "train_multi_domain"
        / "amazon" / "seed42")
    assert not out.exists()
