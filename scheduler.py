"""Run a study's stage commands in parallel on one machine, in the order their teachers allow.

A reproduce step prints its commands in a dry run (``PYTHON=echo bash reproduce_amazon.sh
table``); this runs them, several at a time, which is what a GPU machine wants: one process
of this project's sizes leaves most of an H100/H200 idle. Each command may first be split into
one process per domain (stages 1-2, ``--domain a b ...`` with ``{domain}`` in its paths) and per
variant (stage 4): the same runs, since every run seeds itself. A command starts once the runs
its ``--teacher_dir`` names have been made by the commands before it (or already exist). Among
the commands that may start, those of an earlier plan file come first, then those with the
longest estimated chain of work behind them (stage 3 before the stage-1 teachers: stage 4's
students wait on it). With ``--order students``, the commands that distil from a teacher that is
there go before any other of their plan: on a machine that may be gone before the study ends
(a CPU over many sessions), few teachers wait for their students at any time, so a lost
machine loses little more than the runs in progress, their weights with them.

Reads:  plan files (the dry run's output: lines naming a stage script, the rest ignored).
Writes: LOG_DIR/<job>.log per command and LOG_DIR/schedule.tsv (start, end, wall time and exit
        status per command); with --mirror, each finished run's small files (utils.py
        PROVENANCE_FILES) copied there, the layout below --root kept, as soon as its command
        ends, so a stop at the deadline still leaves what finished.

    PYTHON=echo SEEDS="42 43 44" bash reproduce_amazon.sh table > table.plan
    python scheduler.py table.plan --jobs 8 --split --log_dir logs \\
        --root runs/amazon_real --mirror "$OUT/runs" --deadline_s 480

A failed command's dependants are not started; the exit status is 1 when any command failed or
was stopped at the deadline (they resume on a later call: the stages keep a resume state).
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from plan import STAGE_SCRIPTS, TEMPLATE_FLAGS, expand_runs, flag_values


# Relative cost of one optimisation step of each stage at the same batch per domain (a teacher
# step is 1): only the order of the estimates matters (which chain to start first).
STEP_COST = {"train_domain.py": 1.0, "finetune_domain.py": 0.7, "train_multi_domain.py": 4.0,
             "finetune_multi_domain.py": 2.8, "train_meta_teacher.py": 4.0,
             "finetune_metakd.py": 1.2}  # B1 and B2 (--num_train_epochs counts B2's alone)
STUDENT_SIZED = 0.35      # stages 1 and 3 with --init_layers: the student trained on labels
META_VARIANTS = {"hrkd": 1.5, "no_hierarchy": 1.5}  # the graph's meta step on top
START_COST = 10.0         # a process start, in teacher steps
STEPS_PER_EPOCH = 50      # a domain's 1,600 training reviews at batch 32 (train_ratio 0.9)


@dataclass
class Job:
    """One process: a stage script and its arguments."""
    argv: List[str]
    plan: int = 0                       # index of the plan file it came from
    name: str = ""
    deps: List[int] = field(default_factory=list)
    cost: float = 0.0
    chain: float = 0.0                  # its cost plus the longest chain of dependants

    @property
    def script(self) -> str:
        return os.path.basename(self.argv[0])

    def values(self, flag: str) -> List[str]:
        """The words after ``flag`` up to the next flag."""
        return flag_values(self.argv, flag)

    def value(self, flag: str) -> Optional[str]:
        words = self.values(flag)
        return words[0] if words else None

    def with_values(self, flag: str, words: Sequence[str]) -> List[str]:
        """argv with ``flag``'s words replaced."""
        start = self.argv.index(flag) + 1
        end = start
        while end < len(self.argv) and not self.argv[end].startswith("--"):
            end += 1
        return self.argv[:start] + list(words) + self.argv[end:]

    def expand(self, path: Optional[str]) -> List[str]:
        """The run folders a templated path names for this job's domains and variants."""
        if path is None:
            return []
        return [os.path.normpath(p) for p in expand_runs(self.argv, path)]

    def outputs(self) -> List[str]:
        return self.expand(self.value("--output_dir"))

    def inputs(self) -> List[str]:
        return self.expand(self.value("--teacher_dir"))


def read_plan(lines: Sequence[str], plan: int = 0) -> List[Job]:
    """The stage commands of a dry run's output, in its order (other lines are left out)."""
    jobs = []
    for line in lines:
        words = shlex.split(line)
        if words and os.path.basename(words[0]) in STAGE_SCRIPTS:
            jobs.append(Job(argv=words, plan=plan))
    return jobs


def split_job(job: Job) -> List[Job]:
    """One job per domain and per variant where the command lists several (with their
    placeholders in the paths, which the stages require)."""
    parts = [job]
    for key, flag in TEMPLATE_FLAGS:
        result = []
        for part in parts:
            names = part.values(flag)
            if len(names) > 1 and key in (part.value("--output_dir") or ""):
                result += [Job(argv=part.with_values(flag, [name]), plan=part.plan)
                           for name in names]
            else:
                result.append(part)
        parts = result
    return parts


def estimate_cost(job: Job) -> float:
    """Estimated work of a job in teacher steps (process starts included)."""
    if job.value("--max_steps"):
        steps = float(job.value("--max_steps"))
    else:
        epochs = float(job.value("--num_train_epochs") or 1)
        ratio = float(job.value("--train_ratio") or 0.9)
        steps = epochs * max(1.0, STEPS_PER_EPOCH * ratio / 0.9)
    per_step = STEP_COST.get(job.script, 1.0)
    if job.values("--init_layers"):
        per_step *= STUDENT_SIZED
    units = 0.0
    for variant in job.values("--variant") or [None]:
        units += META_VARIANTS.get(variant, 1.0)
    units *= max(1, len(job.values("--domain")))
    return START_COST + steps * per_step * units


def job_name(job: Job, index: int, root: Optional[str] = None) -> str:
    """A file-name-safe label: the index and the first run folder below ``root`` (else its
    last four parts), e.g. ``042_labels_only_domain.amazon.books.seed42``."""
    out = job.outputs()
    parts = [job.script[:-3]]
    if out:
        rel = os.path.relpath(out[0], root) if root else out[0]
        parts = rel.strip("/").split("/")
        parts = parts if root and not rel.startswith("..") else parts[-4:]
    name = f"{index:03d}_" + ".".join(parts)
    return "".join(c if c.isalnum() or c in "._-+" else "_" for c in name)


def link(jobs: List[Job], root: Optional[str] = None) -> List[Job]:
    """Names, dependencies (the earlier job making each teacher run) and chain estimates."""
    made_by: Dict[str, int] = {}
    for index, job in enumerate(jobs):
        job.name = job_name(job, index, root)
        job.cost = estimate_cost(job)
        job.deps = sorted({made_by[path] for path in job.inputs() if path in made_by})
        for path in job.outputs():
            made_by.setdefault(path, index)
    for index in reversed(range(len(jobs))):
        after = [jobs[j].chain for j in range(index + 1, len(jobs)) if index in jobs[j].deps]
        jobs[index].chain = jobs[index].cost + max(after, default=0.0)
    return jobs


def copy_small_files(job: Job, root: str, mirror: str) -> List[str]:
    """Each finished run of the job's into the mirror (utils.collect_finished)."""
    from utils import collect_finished
    copied = []
    for run in job.outputs():
        if not os.path.isdir(run):
            continue
        rel = os.path.relpath(run, root)
        copied += [os.path.join(rel, r) for r in collect_finished(run, os.path.join(mirror, rel))]
    return copied


class Scheduler:
    """Runs jobs up to ``jobs`` at a time; see the module docstring."""

    def __init__(self, jobs: List[Job], workers: int, python: str, log_dir: str,
                 root: Optional[str] = None, mirror: Optional[str] = None,
                 deadline_s: Optional[float] = None, threads: Optional[int] = None,
                 give_up_after: Optional[int] = None, order: str = "chain"):
        self.jobs, self.workers, self.python = jobs, workers, python
        self.order = order
        self.log_dir, self.root, self.mirror = log_dir, root, mirror
        self.deadline = None if deadline_s is None else time.time() + deadline_s
        self.threads, self.give_up_after = threads, give_up_after
        self.state = ["waiting"] * len(jobs)    # waiting, running, done, failed, skipped, stopped
        self.procs: Dict[int, subprocess.Popen] = {}
        self.started: Dict[int, float] = {}
        self.rows: List[str] = []

    def say(self, message: str):
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def ready(self) -> List[int]:
        """Waiting jobs whose dependencies are done, best first; jobs whose dependency failed
        are marked skipped."""
        out = []
        for index, job in enumerate(self.jobs):
            if self.state[index] != "waiting":
                continue
            dep_states = [self.state[d] for d in job.deps]
            if any(s in ("failed", "skipped", "stopped") for s in dep_states):
                self.state[index] = "skipped"
                self.say(f"skipped {job.name}: a teacher run did not finish")
                continue
            if all(s == "done" for s in dep_states):
                out.append(index)
        return sorted(out, key=self.priority)

    def priority(self, index: int):
        """Sort key of a ready job: its plan, then (--order students) whether it reads a
        teacher, then the longest chain."""
        job = self.jobs[index]
        student_first = 0 if self.order == "students" and job.inputs() else 1
        return (job.plan, student_first, -job.chain, index)

    def start(self, index: int):
        job = self.jobs[index]
        env = dict(os.environ)
        if self.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(self.threads)
        log = open(os.path.join(self.log_dir, f"{job.name}.log"), "w")
        log.write(" ".join(shlex.quote(w) for w in job.argv) + "\n")
        log.flush()
        argv = [self.python] + job.argv
        # a session of its own, so that the deadline stops the stage and its workers
        self.procs[index] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             env=env, start_new_session=True)
        log.close()
        self.started[index] = time.time()
        self.state[index] = "running"
        self.say(f"started {job.name}")

    def finish(self, index: int, code: int):
        job = self.jobs[index]
        if self.state[index] != "stopped":
            self.state[index] = "done" if code == 0 else "failed"
        wall = time.time() - self.started[index]
        self.rows.append("\t".join([
            job.name, time.strftime("%F %T", time.localtime(self.started[index])),
            time.strftime("%F %T"), f"{wall:.0f}", str(code), self.state[index],
            " ".join(job.argv)]))
        self.write_table()
        copied = []
        if self.mirror and self.root:
            copied = copy_small_files(job, self.root, self.mirror)
        self.say(f"{self.state[index]} {job.name} ({wall:.0f} s, exit {code}"
                 f"{', ' + str(len(copied)) + ' runs kept' if copied else ''})")

    def write_table(self):
        path = os.path.join(self.log_dir, "schedule.tsv")
        header = "job\tstarted\tended\twall_s\texit\tstate\tcommand\n"
        with open(path + ".tmp", "w") as handle:
            handle.write(header + "".join(row + "\n" for row in self.rows))
        os.replace(path + ".tmp", path)

    def stop_all(self):
        for index, proc in self.procs.items():
            self.state[index] = "stopped"
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.time() + 30
        for index, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.finish(index, proc.returncode)
        self.procs.clear()

    def counts(self) -> str:
        """e.g. '12 done, 3 running, 20 waiting'."""
        return ", ".join(f"{self.state.count(s)} {s}" for s in sorted(set(self.state)))

    def broken(self) -> bool:
        """The first give_up_after jobs to end all failed: the setup is wrong (a missing
        package, a bad path), and running the rest would only spend the machine's time."""
        if not self.give_up_after or "done" in self.state:
            return False
        return self.state.count("failed") >= self.give_up_after

    def run(self) -> int:
        os.makedirs(self.log_dir, exist_ok=True)
        self.say(f"{len(self.jobs)} jobs, {self.workers} at a time")
        last_report = time.time()
        while True:
            if time.time() - last_report >= 60:  # where the run stands, once a minute
                last_report = time.time()
                self.say("so far: " + self.counts())
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None:
                    del self.procs[index]
                    self.finish(index, code)
            if self.broken():
                self.say(f"giving up: the first {self.state.count('failed')} jobs to end "
                         f"failed (see their logs in {self.log_dir})")
                self.stop_all()
                break
            if self.deadline is not None and time.time() >= self.deadline:
                if self.procs:
                    self.say(f"deadline: stopping {len(self.procs)} running jobs")
                self.stop_all()
                break
            for index in self.ready()[:self.workers - len(self.procs)]:
                self.start(index)
            if not self.procs:
                break
            time.sleep(0.2)
        left = [i for i, s in enumerate(self.state) if s == "waiting"]
        for index in left:
            self.state[index] = "stopped"
        self.say("end: " + self.counts())
        return 0 if all(s == "done" for s in self.state) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="+", help="dry-run outputs; earlier files go first")
    parser.add_argument("--jobs", type=int, default=4, help="processes at a time")
    parser.add_argument("--split", action="store_true",
                        help="one process per domain (stages 1-2) and per variant (stage 4)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the stages")
    parser.add_argument("--log_dir", required=True, help="per-job logs and schedule.tsv")
    parser.add_argument("--root", default=None, help="the runs' root (the layout to mirror)")
    parser.add_argument("--mirror", default=None,
                        help="copy each finished run's small files here (needs --root)")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="stop everything this many seconds after the start")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads per process (default: torch's own choice)")
    parser.add_argument("--give_up_after", type=int, default=None,
                        help="stop everything when this many jobs failed before any finished")
    parser.add_argument("--order", choices=("chain", "students"), default="chain",
                        help="among the ready commands of a plan: the longest chain of work "
                             "first (the shortest study on many workers), or the students of "
                             "finished teachers first (the least work lost with the machine)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the order and the dependencies, run nothing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.mirror and not args.root:
        print("error: --mirror needs --root (the layout below it is kept)", file=sys.stderr)
        return 2
    jobs = []
    for number, path in enumerate(args.plans):
        try:
            with open(path) as handle:
                plan = read_plan(handle.read().splitlines(), plan=number)
        except (OSError, ValueError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 2
        if not plan:
            print(f"error: {path}: no stage command ({', '.join(STAGE_SCRIPTS)})",
                  file=sys.stderr)
            return 2
        jobs += plan
    if args.split:
        jobs = [part for job in jobs for part in split_job(job)]
    jobs = link(jobs, args.root)
    if args.dry_run:
        for job in jobs:
            deps = ",".join(jobs[d].name[:3] for d in job.deps) or "-"
            print(f"{job.name}\tafter {deps}\tcost {job.cost:.0f}\tchain {job.chain:.0f}")
        return 0
    scheduler = Scheduler(jobs, args.jobs, args.python, args.log_dir, root=args.root,
                          mirror=args.mirror, deadline_s=args.deadline_s, threads=args.threads,
                          give_up_after=args.give_up_after, order=args.order)
    return scheduler.run()


if __name__ == "__main__":
    sys.exit(main())
