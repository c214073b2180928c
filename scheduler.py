"""Run a study's stage commands as Ray tasks, in the order their teachers allow.

A reproduce step prints its commands in a dry run (``PYTHON=echo bash reproduce.sh amazon
table``); this runs them, several at a time, on this machine (a local Ray instance) or on a Ray
cluster (``--address`` or ``RAY_ADDRESS``; README, More machines): one Ray task a run, on
whichever node has the CPUs (``--threads`` each) and GPUs (``--gpus_per_run``, a fraction
shares one) it asks for. One process of this project's sizes leaves most of an H100/H200 idle.
Each command may first be split into one process per domain (stages 1-2, ``--domain a b ...``
with ``{domain}`` in its paths) and per variant (stage 4): the same runs, since every run seeds
itself. A command starts once the runs its ``--teacher_dir`` names have been made by the
commands before it (or already exist). Among the commands that may start, those of an earlier
plan file come first, then those with the longest estimated chain of work behind them (stage 3
before the stage-1 teachers: stage 4's students wait on it). With ``--order students``, the
commands that distil from a teacher that is there go before any other of their plan: on a
machine that may be gone before the study ends (a CPU over many sessions), few teachers wait
for their students at any time, so a lost machine loses little more than the runs in progress,
their weights with them.

Before anything starts, every node must see the runs folder (``--root``, else the log folder)
and the project at this machine's paths (cluster.check_nodes). A run whose node is lost, or
whose stage fails, is tried again (three tries in all) and resumes from its last checkpoint; a
finished run is never retrained. The deadline, Ctrl-C and SIGTERM cancel the running tasks,
whose stages get SIGTERM and stop at a step boundary; what is left is printed, and the same
command continues it.

Reads:  plan files (the dry run's output: lines naming a stage script, the rest ignored).
Writes: LOG_DIR/<job>.log per command (each try's output after a header line) and
        LOG_DIR/schedule.tsv (start, end, wall time, exit status, node and tries per command);
        with --mirror, each finished run's small files (utils.py PROVENANCE_FILES) copied
        there, the layout below --root kept, as soon as its command ends, so a stop at the
        deadline still leaves what finished.

    PYTHON=echo SEEDS="42 43 44" bash reproduce.sh amazon table > table.plan
    python scheduler.py table.plan --jobs 8 --split --log_dir logs \\
        --root runs/amazon_real --mirror "$OUT/runs" --deadline_s 480

A failed command's dependants are not started; the exit status is 1 when any command failed or
was stopped (they resume on a later call: the stages keep a resume state), 2 on a bad flag or a
refused cluster.
"""
import argparse
import contextlib
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import cluster
from plan import STAGE_SCRIPTS, TEMPLATE_FLAGS, expand_runs, flag_values

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))  # the workers import cluster.py here


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
    """Runs jobs as Ray tasks, as many at a time as ``workers`` (else the cluster's CPUs, or
    GPUs at ``gpus_per_run`` each) allow; see the module docstring."""

    def __init__(self, jobs: List[Job], workers: Optional[int], python: str, log_dir: str,
                 root: Optional[str] = None, mirror: Optional[str] = None,
                 deadline_s: Optional[float] = None, threads: Optional[int] = None,
                 give_up_after: Optional[int] = None, order: str = "chain",
                 gpus_per_run: float = 0.0, cwd: Optional[str] = None):
        self.jobs, self.workers, self.python = jobs, workers, python
        self.order = order
        self.log_dir = os.path.abspath(log_dir)
        self.root, self.mirror = root, mirror
        self.cwd = os.path.abspath(cwd or os.getcwd())
        self.deadline = None if deadline_s is None else time.time() + deadline_s
        self.threads, self.give_up_after = threads, give_up_after
        self.gpus_per_run = gpus_per_run
        self.state = ["waiting"] * len(jobs)    # waiting, running, done, failed, skipped, stopped
        self.running: Dict[object, int] = {}    # Ray object ref -> job index
        self.started: Dict[int, float] = {}
        self.rows: List[str] = []
        self.stop_reason: Optional[str] = None
        self.nodes_checked: set = set()
        self.own_instance = False  # a local Ray instance this process started
        self.bar = None

    def say(self, message: str):
        line = f"{time.strftime('%H:%M:%S')} {message}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

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
                self.advance()
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

    def cpus_per_run(self) -> int:
        return self.threads or 1

    def capacity(self) -> int:
        """Runs at a time: --jobs, else what the cluster's CPUs (and GPUs) hold now."""
        if self.workers:
            return self.workers
        import ray
        total = ray.cluster_resources()
        slots = int(total.get("CPU", 0) // self.cpus_per_run())
        if self.gpus_per_run:
            slots = min(slots, int(total.get("GPU", 0) / self.gpus_per_run + 1e-9))
        return max(1, slots)

    def check_new_nodes(self):
        """Every node that runs work sees the runs folder and the project (cluster.py): the
        nodes there at the start, and any that joins later before it gets a run."""
        if self.own_instance:  # started here on 127.0.0.1: its one node is this machine
            return
        nodes = [node for node in cluster.live_nodes()
                 if node["NodeID"] not in self.nodes_checked]
        if not nodes:
            return
        labels = cluster.check_nodes(self.root or self.log_dir, PROJECT_DIR, self.python,
                                     nodes)
        self.nodes_checked.update(node["NodeID"] for node in nodes)
        self.say(f"{len(labels)} node(s) see {self.root or self.log_dir} and the project: "
                 + ", ".join(labels))

    def start(self, index: int, task):
        job = self.jobs[index]
        log_path = os.path.join(self.log_dir, f"{job.name}.log")
        if os.path.exists(cluster.stop_file(log_path)):  # an earlier call's stop request
            os.remove(cluster.stop_file(log_path))
        with open(log_path, "w", encoding="utf-8") as log:  # each try appends its output
            log.write(" ".join(shlex.quote(w) for w in job.argv) + "\n")
        # the run folders as the command names them: run_stage joins them to self.cwd
        ref = task.remote(job.argv, self.python, self.cwd, log_path, job.outputs(), self.threads)
        self.running[ref] = index
        self.started[index] = time.time()
        self.state[index] = "running"
        self.say(f"started {job.name}")

    def finish(self, index: int, outcome):
        """Record a job's end: ``outcome`` is run_stage's dict or the exception Ray gave."""
        import ray.exceptions as errors
        job = self.jobs[index]
        node, attempt, code, why = "", "", 0, ""
        if isinstance(outcome, dict):
            self.state[index] = "done"
            node, attempt = outcome["node"], str(outcome["attempt"])
        elif isinstance(outcome, (errors.TaskCancelledError, KeyboardInterrupt)) or isinstance(
                getattr(outcome, "cause", None), cluster.StageStopped):
            self.state[index], code = "stopped", 143
        elif isinstance(outcome, errors.LocalRayletDiedError):
            # Ray itself is gone from this machine (`ray stop`, a killed instance): every
            # later task would fail the same way, so the call ends here and says what is left
            self.state[index], code = "stopped", 1
            self.stop_reason = self.stop_reason or "Ray's local raylet died"
        else:
            cause = getattr(outcome, "cause", None)
            if isinstance(cause, cluster.StageFailed):
                code, why = cause.code, cause.last_line
            else:
                code, why = 1, " ".join(str(outcome).split())[:300]
            self.state[index] = "stopped" if self.stop_reason else "failed"
            attempt = str(cluster.attempts_so_far(os.path.join(self.log_dir,
                                                                f"{job.name}.log")))
        wall = time.time() - self.started[index]
        self.rows.append("\t".join([
            job.name, time.strftime("%F %T", time.localtime(self.started[index])),
            time.strftime("%F %T"), f"{wall:.0f}", str(code), self.state[index], node, attempt,
            " ".join(job.argv)]))
        self.write_table()
        copied = []
        if self.mirror and self.root:
            copied = copy_small_files(job, self.root, self.mirror)
        tries = f", {attempt} tries" if attempt not in ("", "1") else ""
        self.say(f"{self.state[index]} {job.name} ({wall:.0f} s, exit {code}"
                 f"{', on ' + node if node else ''}{tries}"
                 f"{', ' + str(len(copied)) + ' runs kept' if copied else ''})"
                 + (f": {why}" if self.state[index] == "failed" else ""))
        self.advance()

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self.counts(), refresh=False)

    def write_table(self):
        path = os.path.join(self.log_dir, "schedule.tsv")
        header = "job\tstarted\tended\twall_s\texit\tstate\tnode\ttries\tcommand\n"
        with open(path + ".tmp", "w") as handle:
            handle.write(header + "".join(row + "\n" for row in self.rows))
        os.replace(path + ".tmp", path)

    def collect(self, timeout: float):
        """Record the jobs that ended within ``timeout`` seconds."""
        import ray
        if not self.running:
            return
        done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout,
                           fetch_local=False)
        for ref in done:
            index = self.running.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - Ray's errors are the outcome
                outcome = error
            self.finish(index, outcome)

    def stop_all(self, reason: str):
        """Cancel the running tasks (each sends SIGTERM to its stage, which stops at a step
        boundary) and wait until they have ended."""
        import ray
        self.stop_reason = reason
        if self.running:
            self.say(f"{reason}: stopping {len(self.running)} running run(s)")
        for index in self.running.values():
            log_path = os.path.join(self.log_dir, f"{self.jobs[index].name}.log")
            open(cluster.stop_file(log_path), "w").close()
        for ref in self.running:   # a task not yet begun never starts its stage
            with contextlib.suppress(Exception):   # Ray may be gone already
                ray.cancel(ref)
        end = time.time() + cluster.STOP_GRACE_S + 30
        while self.running and time.time() < end:
            self.collect(timeout=1.0)
        for ref in list(self.running):  # never ended: recorded as stopped all the same
            self.finish(self.running.pop(ref), KeyboardInterrupt())

    def counts(self) -> str:
        """e.g. '12 done, 3 running, 20 waiting'."""
        return ", ".join(f"{self.state.count(s)} {s}" for s in sorted(set(self.state)))

    def broken(self) -> bool:
        """The first give_up_after jobs to end all failed: the setup is wrong (a missing
        package, a bad path), and running the rest would only spend the machine's time."""
        if not self.give_up_after or "done" in self.state:
            return False
        return self.state.count("failed") >= self.give_up_after

    def ask_stop(self, signum, _frame):
        self.stop_reason = signal.Signals(signum).name

    def run(self) -> int:
        os.makedirs(self.log_dir, exist_ok=True)
        task = cluster.stage_task(self.cpus_per_run(), self.gpus_per_run)
        self.check_new_nodes()
        self.say(f"{len(self.jobs)} jobs, {self.workers or 'as many as the cluster holds'} "
                 f"at a time, {self.cpus_per_run()} CPU(s)"
                 f"{f' and {self.gpus_per_run:g} GPU' if self.gpus_per_run else ''} each")
        from tqdm import tqdm
        self.bar = tqdm(total=len(self.jobs), unit="run", desc="runs", disable=None,
                        dynamic_ncols=True)
        previous = {sig: signal.signal(sig, self.ask_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        last_report = time.time()
        try:
            while True:
                if time.time() - last_report >= 60:  # where the run stands, once a minute
                    last_report = time.time()
                    self.say("so far: " + self.counts())
                    self.check_new_nodes()
                self.collect(timeout=0.2)
                if self.stop_reason:
                    self.stop_all(self.stop_reason)
                    break
                if self.broken():
                    self.say(f"giving up: the first {self.state.count('failed')} jobs to end "
                             f"failed (see their logs in {self.log_dir})")
                    self.stop_all("giving up")
                    break
                if self.deadline is not None and time.time() >= self.deadline:
                    self.stop_all("deadline")
                    break
                for index in self.ready()[:max(0, self.capacity() - len(self.running))]:
                    self.start(index, task)
                if not self.running:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.bar.close()
            self.bar = None
        left = [i for i, s in enumerate(self.state) if s == "waiting"]
        for index in left:
            self.state[index] = "stopped"
        self.say("end: " + self.counts())
        unfinished = [job.name for job, s in zip(self.jobs, self.state) if s != "done"]
        if unfinished:
            self.say(f"left ({len(unfinished)}; the same command resumes them): "
                     + " ".join(unfinished))
        return 0 if not unfinished else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="+", help="dry-run outputs; earlier files go first")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time (default: as many as the cluster's CPUs hold at "
                             "--threads each, or its GPUs at --gpus_per_run)")
    parser.add_argument("--split", action="store_true",
                        help="one process per domain (stages 1-2) and per variant (stage 4)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the stages (the same path on every node)")
    parser.add_argument("--log_dir", required=True, help="per-job logs and schedule.tsv")
    parser.add_argument("--root", default=None,
                        help="the runs' root: the layout to mirror, and the folder every node "
                             "must see (default: --log_dir)")
    parser.add_argument("--mirror", default=None,
                        help="copy each finished run's small files here (needs --root)")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="stop everything this many seconds after the start")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads per process, and the CPUs its Ray task asks for "
                             "(default: 1 CPU, torch's own thread count)")
    parser.add_argument("--gpus_per_run", type=float, default=0.0,
                        help="GPUs each run's Ray task asks for; 0.25 puts four runs on a GPU "
                             "(Ray sets CUDA_VISIBLE_DEVICES). Default 0: no GPU reserved, "
                             "every run sees the node's GPUs")
    parser.add_argument("--give_up_after", type=int, default=None,
                        help="stop everything when this many jobs failed before any finished")
    parser.add_argument("--order", choices=("chain", "students"), default="chain",
                        help="among the ready commands of a plan: the longest chain of work "
                             "first (the shortest study on many workers), or the students of "
                             "finished teachers first (the least work lost with the machine)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="the Ray cluster to run on, e.g. 10.0.0.1:6379 (default: "
                             "RAY_ADDRESS, else a local Ray instance of this machine on "
                             "127.0.0.1)")
    parser.add_argument("--allow_unauthenticated_cluster", action="store_true",
                        help="connect to a cluster of other machines without Ray's token "
                             "authentication (RAY_AUTH_MODE=token), accepting that whoever "
                             "reaches its ports runs code on it")
    parser.add_argument("--dashboard_host", default="127.0.0.1",
                        help="where the dashboard of a local instance listens (0.0.0.0: every "
                             "interface; keep it private)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the order and the dependencies, run nothing")
    return parser


def read_plans(paths: Sequence[str]) -> List[Job]:
    """The jobs of every plan file, in order; ValueError names a file that has none."""
    jobs = []
    for number, path in enumerate(paths):
        try:
            with open(path) as handle:
                plan = read_plan(handle.read().splitlines(), plan=number)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None
        if not plan:
            raise ValueError(f"{path}: no stage command ({', '.join(STAGE_SCRIPTS)})")
        jobs += plan
    return jobs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value, low in (("--jobs", args.jobs, 1), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            print(f"error: {flag} must be at least {low}, got {value}", file=sys.stderr)
            return 2
    if args.gpus_per_run < 0:
        print(f"error: --gpus_per_run must be 0 or more, got {args.gpus_per_run:g}",
              file=sys.stderr)
        return 2
    if args.mirror and not args.root:
        print("error: --mirror needs --root (the layout below it is kept)", file=sys.stderr)
        return 2
    try:
        jobs = read_plans(args.plans)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
                          give_up_after=args.give_up_after, order=args.order,
                          gpus_per_run=args.gpus_per_run)
    try:
        cluster.refuse_unauthenticated(args.address, args.allow_unauthenticated_cluster)
        # a local instance: room for --jobs runs at --threads CPUs each, whatever the cores
        cpus = max(os.cpu_count() or 1, (args.jobs or 1) * scheduler.cpus_per_run())
        connection = cluster.connect(args.address, PROJECT_DIR, num_cpus=cpus,
                                     dashboard_host=args.dashboard_host)
    except cluster.ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scheduler.own_instance = connection.started_here
    try:
        if connection.dashboard_url:
            print(f"Ray dashboard: {connection.dashboard_url}", flush=True)
        return scheduler.run()
    except cluster.ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(main())
