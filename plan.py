"""What a step of reproduce.sh (either task) still has to run, and about how long it takes.

Reads the commands of a dry run (``PYTHON=echo``: one stage command per line, and the
``== <stage>`` lines that ``timed`` prints) on stdin; expands each command's run directories
(``{domain}`` over --domain, ``{variant}`` over --variant); asks each run its state
(utils.run_status); estimates the time of what is left from the finished runs under --runs
(seconds per step of the same script at the same sequence length, on the same task, with the
same batches, padded or --length_buckets: timing.json's wall seconds, else config.json's
"started" to results.json's last write, the finished marker; runs
that were resumed are not used) that ran on --machine, or, where none alike did, from the
committed runs under --pace that ran on --machine, and last from those under --runs that ran
on other machines (a study's folder that moved between machines of two speeds). Prints one
line per stage and a total. Torch-free.

    PYTHON=echo bash reproduce_amazon.sh table | python plan.py --runs runs/amazon_real \
        --pace results --machine "$(python -c 'import torch, runtime;
        print(runtime.describe_machine(torch.device("cpu")))')"
(``bash reproduce_amazon.sh left`` does this for the table and the few-shot study.)
"""
from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from utils import RunDir, plural, read_json, run_status

STAGE_SCRIPTS = ("train_domain.py", "train_multi_domain.py", "finetune_domain.py",
                 "finetune_multi_domain.py", "train_meta_teacher.py", "finetune_metakd.py")


@dataclass
class PlannedRun:
    script: str
    path: str
    seq_length: int
    train_ratio: float
    epochs: float
    max_steps: int
    blocks: int = 0                     # --init_layers count (a student's model on labels)
    task: str = ""                      # --task: another task's steps are other steps
    buckets: bool = False               # --length_buckets: shorter steps than padded ones
    state: str = "missing"
    step: Optional[int] = None
    total_steps: Optional[int] = None


@dataclass
class Section:
    name: str
    runs: List[PlannedRun] = field(default_factory=list)


def flag_values(words: List[str], name: str) -> List[str]:
    """The values after ``name`` up to the next flag (a dry run's command, split)."""
    if name not in words:
        return []
    values = []
    for word in words[words.index(name) + 1:]:
        if word.startswith("--"):
            break
        values.append(word)
    return values


# The placeholders a stage fills in per run (stages.runs_per_domain / runs_per_variant).
TEMPLATE_FLAGS = (("{domain}", "--domain"), ("{variant}", "--variant"))


def expand_runs(words: List[str], template: str) -> List[str]:
    """The run folders a path with {domain} / {variant} names for the command's --domain and
    --variant values."""
    paths = [template]
    for key, flag in TEMPLATE_FLAGS:
        if key in template:
            paths = [p.replace(key, name) for p in paths for name in flag_values(words, flag)]
    return paths


def parse_commands(lines) -> List[Section]:
    """The stage runs of a dry run's output, grouped under its ``== name`` lines."""
    sections = [Section("")]
    for line in lines:
        line = line.strip()
        if line.startswith("== "):
            sections.append(Section(line[3:].split(" (")[0]))
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        script = next((os.path.basename(w) for w in words
                       if os.path.basename(w) in STAGE_SCRIPTS), None)
        if script is None or not flag_values(words, "--output_dir"):
            continue
        paths = expand_runs(words, flag_values(words, "--output_dir")[0])
        number = lambda name, default: float((flag_values(words, name) or [default])[0])  # noqa: E731
        for path in paths:
            sections[-1].runs.append(PlannedRun(
                script, path, int(number("--max_seq_length", 128)),
                number("--train_ratio", 0.9), number("--num_train_epochs", 1),
                int(number("--max_steps", 0)), len(flag_values(words, "--init_layers")),
                (flag_values(words, "--task") or [""])[0], "--length_buckets" in words))
    return [s for s in sections if s.runs]


def wall_seconds(run_dir: str, trust_mtime: bool = True) -> Optional[float]:
    """timing.json's seconds (written by the training process as it finished), else, with
    ``trust_mtime`` (the runs' own folder, not a copy or a clone), from config.json's start to
    the finished marker: results.json's modification time (the marker is written last)."""
    timing = read_json(os.path.join(run_dir, RunDir.TIMING), None)
    if isinstance(timing, dict) and timing.get("seconds"):
        return None if timing.get("resumed") else float(timing["seconds"])
    if not trust_mtime:
        return None
    config = read_json(os.path.join(run_dir, RunDir.CONFIG), {}) or {}
    results = os.path.join(run_dir, RunDir.RESULTS)
    finished = (read_json(results, {}) or {}).get("finished") or {}
    if (not config.get("started") or not finished or config.get("resumes")
            or os.path.isfile(os.path.join(run_dir, "config_resumed.json"))):  # older runs
        return None
    end = datetime.datetime.fromtimestamp(os.path.getmtime(results))
    seconds = (end - datetime.datetime.fromisoformat(config["started"])).total_seconds()
    return seconds if seconds > 0 else None


@dataclass
class Measured:
    """A finished run that says how fast its script runs."""
    script: str
    seq_length: int
    train_ratio: float
    epochs: float
    max_steps: int
    steps: int
    seconds: float
    blocks: int = 0
    machine: Optional[str] = None   # config.json's description of where it ran, if it says
    task: str = ""
    buckets: bool = False


def measured_runs(root: str, machine: Optional[str] = None) -> List[Measured]:
    """The finished runs under ``root`` with a known wall time. With ``machine`` (config.json's
    description), ``root`` holds copies (results/): only runs of that machine, with timing.json."""
    found = []
    for path in glob.glob(os.path.join(root, "**", RunDir.RESULTS), recursive=True):
        run_dir = os.path.dirname(path)
        config = read_json(os.path.join(run_dir, RunDir.CONFIG), {}) or {}
        if machine is not None and config.get("machine") != machine:
            continue
        finished = (read_json(path, {}) or {}).get("finished") or {}
        seconds = wall_seconds(run_dir, trust_mtime=machine is None)
        command = config.get("command") or [""]
        args = config.get("args", {})
        if seconds is None or not finished.get("train_steps"):
            continue
        found.append(Measured(os.path.basename(command[0]), int(args.get("max_seq_length", 0)),
                              float(args.get("train_ratio", 0.9)),
                              float(args.get("num_train_epochs", 1)),
                              int(args.get("max_steps", 0)), int(finished["train_steps"]),
                              seconds, len(args.get("init_layers") or []),
                              config.get("machine"), args.get("task") or "",
                              bool(args.get("length_buckets"))))
    return found


def estimate(run: PlannedRun, measured: List[Measured]) -> Optional[float]:
    """Seconds left for ``run``: its steps left times the seconds per step of finished runs of
    the same script and sequence length; the steps from the run itself, its --max_steps, or a
    finished run's steps scaled by the training ratio and the epochs."""
    # same script, sequence length and model (a student's blocks trained on the labels run at
    # a student's pace, not a teacher's), same task (its domains, their sizes: the steps of an
    # epoch) and batches (length-bucketed steps are shorter than padded ones)
    same = [m for m in measured if m.script == run.script and m.seq_length == run.seq_length
            and m.blocks == run.blocks and m.task == run.task and m.buckets == run.buckets]
    if not same:
        return None
    per_step = sum(m.seconds for m in same) / sum(m.steps for m in same)
    if run.total_steps:
        total = run.total_steps
    elif run.max_steps:
        total = run.max_steps
    else:
        # only a run that trained whole epochs says how many steps an epoch has (a --max_steps
        # run's --num_train_epochs is not what it trained)
        by_epochs = [m for m in same if not m.max_steps]
        if not by_epochs:
            return None
        reference = min(by_epochs, key=lambda m: abs(m.train_ratio - run.train_ratio))
        # rounded first: 153 / 3 * 3 * 0.9 / 0.9 is 153.00000000000003, not a 154th step
        total = math.ceil(round(reference.steps / reference.epochs * run.epochs
                                * run.train_ratio / reference.train_ratio, 6))
    return per_step * max(total - (run.step or 0), 1)


def _progress(run: PlannedRun) -> str:
    """" at step 150 of 1210" (the total left out while the run has not recorded it yet)."""
    if not run.step:
        return ""
    return f" at step {run.step}" + (f" of {run.total_steps}" if run.total_steps else "")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def summarise(sections: List[Section], root: str, pace: Tuple[str, ...] = (),
              machine: Optional[str] = None) -> Tuple[str, float, int]:
    """The printed plan, the estimated seconds left, and the runs left without an estimate.
    Each run left takes the pace of the finished runs alike under ``root`` that ran on
    ``machine`` (all of them when it is None; runs that do not say where they ran count as
    this machine's); failing that, of those under the ``pace`` roots that ran on ``machine``
    (e.g. the committed results/ on a fresh clone); failing that, of those under ``root`` that
    ran elsewhere (a study's folder carried over from a machine of another kind), said so."""
    here = measured_runs(root)
    measured = [m for m in here if machine is None or m.machine in (None, machine)]
    elsewhere = [m for m in here if m not in measured]
    committed = [m for folder in pace if machine for m in measured_runs(folder, machine)]
    lines, total, unknown, from_committed, from_elsewhere = [], 0.0, 0, 0, 0
    for section in sections:
        left = []
        for run in section.runs:
            status = run_status(run.path, need_test=True)
            run.state, run.step, run.total_steps = (status["state"], status.get("step"),
                                                    status.get("total_steps"))
            if run.state != "finished":
                left.append(run)
        seconds = []
        for run in left:
            seconds.append(estimate(run, measured))
            if seconds[-1] is None and committed:
                seconds[-1] = estimate(run, committed)
                from_committed += seconds[-1] is not None
            if seconds[-1] is None and elsewhere:
                seconds[-1] = estimate(run, elsewhere)
                from_elsewhere += seconds[-1] is not None
        known = sum(s for s in seconds if s is not None)
        missing = sum(s is None for s in seconds)
        total, unknown = total + known, unknown + missing
        done = len(section.runs) - len(left)
        text = f"{section.name or 'runs'}: {done} of {plural(len(section.runs), 'run')} finished"
        if left:
            text += f", {len(left)} left"
            if known:
                text += f", about {_duration(known)}"
            if missing:
                text += f" ({missing} without an estimate: nothing like them has finished)"
        lines.append(text)
        for run in left:
            if run.state != "missing":
                lines.append(f"  {run.path}: {run.state}" + _progress(run))
    runs_left = sum(r.state != "finished" for s in sections for r in s.runs)
    footer = f"left: {plural(runs_left, 'run')}"
    if total:
        footer += f", about {_duration(total)} on this machine's past pace"
    if unknown:
        footer += f" ({unknown} of them without an estimate)"
    lines.append(footer)
    if from_committed:
        lines.append(f"({plural(from_committed, 'run')} estimated from the pace of runs under "
                     f"{', '.join(pace)} that ran on this kind of machine: {machine})")
    if from_elsewhere:
        lines.append(f"({plural(from_elsewhere, 'run')} estimated from the pace of runs under "
                     f"{root} that ran on other machines: "
                     f"{'; '.join(sorted({m.machine for m in elsewhere}))})")
    return "\n".join(lines), total, unknown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="what a reproduce step still has to run")
    parser.add_argument("--runs", required=True, help="the runs root of the step (OUT_ROOT)")
    parser.add_argument("--pace", action="append", default=[],
                        help="more roots of finished runs (e.g. results/) whose pace estimates "
                             "runs with nothing alike under --runs; repeatable")
    parser.add_argument("--machine", default=None,
                        help="this machine as config.json describes it "
                             "(runtime.describe_machine()); --pace runs of others are not used")
    args = parser.parse_args(argv)
    text, _, _ = summarise(parse_commands(sys.stdin), args.runs, tuple(args.pace), args.machine)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
