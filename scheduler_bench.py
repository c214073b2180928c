"""bench.py --cases scheduler: a plan's wall time through scheduler.py (Ray tasks on a local
Ray instance it starts) against the scheduler before Ray (subprocesses of its own, taken from
git at --scheduler_baseline), on the same 12-run tiny plan with 2 workers.

The plan: tiny stage-1 teachers of books and dvd for three seeds and each one's stage-2 student
(12 runs, a student after its teacher), on the generated reviews; --scheduler_steps steps a
run. Each round runs both schedulers on fresh folders, in the order ABBA over two rounds, and
times the whole command (Ray's start and stop included: the user waits for them too). A third
scheduler, "ray_running", is the same scheduler.py connecting to a local Ray instance started
once beforehand (`ray start --head` on 127.0.0.1, token authentication on), as a user who runs
many short plans would keep one: its start and stop lie outside the timed command.
"""
from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.abspath(__file__))
BASELINE_FILES = ("scheduler.py", "plan.py", "utils.py")


def tiny_plan(sample: dict, root: str, steps: int) -> str:
    """The dry-run text of the 12-run plan (two commands a seed, split per domain)."""
    common = ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books", "dvd",
              "--max_seq_length", "32", "--batch_size", "8", "--max_steps", str(steps),
              "--val_freq", str(steps), "--no_progress", "--do_train", "--do_test"]
    lines = []
    for seed in (1, 2, 3):
        teacher = f"{root}/train_domain/amazon/{{domain}}/seed{seed}"
        lines.append(["train_domain.py", *common, "--vocab_file", sample["vocab"],
                      "--model_config", "tiny_teacher", "--seed", str(seed),
                      "--output_dir", teacher])
        lines.append(["finetune_domain.py", *common, "--student_config", "tiny_student",
                      "--teacher_dir", teacher, "--seed", str(seed), "--output_dir",
                      f"{root}/finetune_domain/amazon/{{domain}}/seed{seed}"])
    return "".join(" ".join(shlex.quote(w) for w in line) + "\n" for line in lines)


def baseline_scheduler(commit: str, folder: str) -> str:
    """scheduler.py before Ray, with the modules it imports, from git at ``commit``."""
    os.makedirs(folder, exist_ok=True)
    for name in BASELINE_FILES:
        text = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    return os.path.join(folder, "scheduler.py")


def start_local_head(tmp: str):
    """`ray start --head --block` on 127.0.0.1 with a token of its own, as a process of this
    bench (stopping it stops that instance alone; `ray stop` would stop every instance of the
    machine); returns the process and the environment that connects to it (RAY_ADDRESS,
    RAY_AUTH_MODE, RAY_AUTH_TOKEN)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               RAY_USAGE_STATS_ENABLED="0")
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    log = open(os.path.join(tmp, "ray_start.log"), "w+", encoding="utf-8")
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={os.path.join(tmp, 'ray')}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:  # `ray start` prints this line once the head is up
        log.seek(0)
        if "Ray runtime started" in log.read():
            break
        if head.poll() is not None or time.time() > deadline:
            log.seek(0)
            raise RuntimeError(f"ray start --head failed: {log.read()[-500:]}")
        time.sleep(0.2)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    return head, env


def stop_local_head(head: subprocess.Popen):
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


def time_plan(script: str, work: str, sample: dict, steps: int, extra, env=None) -> float:
    """Seconds of one scheduler command on a fresh copy of the plan under ``work``."""
    runs = os.path.join(work, "runs")
    os.makedirs(work, exist_ok=True)
    plan = os.path.join(work, "table.plan")
    with open(plan, "w", encoding="utf-8") as handle:
        handle.write(tiny_plan(sample, runs, steps))
    argv = [sys.executable, script, plan, "--split", "--jobs", "2", "--threads", "1",
            "--order", "students", "--python", sys.executable, "--log_dir",
            os.path.join(work, "logs"), *extra]
    began = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {result.stdout[-500:]}"
                           f"{result.stderr[-500:]}")
    return wall


def scheduler_benchmarks(args, results: dict):
    import sample_corpus
    with tempfile.TemporaryDirectory(prefix="hrkd-scheduler-bench-") as tmp:
        sample = sample_corpus.generate_sample(os.path.join(tmp, "sample"), "tiny", seed=1)
        old = baseline_scheduler(args.scheduler_baseline, os.path.join(tmp, "baseline"))
        new = os.path.join(ROOT, "scheduler.py")
        walls = {"ray": [], "baseline": [], "ray_running": []}
        order = []
        for index in range(args.scheduler_rounds):
            names = ["baseline", "ray", "ray_running"]
            order += names if index % 2 == 0 else names[::-1]
        head, head_env = start_local_head(tmp)
        try:
            for number, name in enumerate(order):
                work = os.path.join(tmp, f"{number}_{name}")
                extra = [] if name == "baseline" else ["--root", os.path.join(work, "runs")]
                env = head_env if name == "ray_running" else \
                    {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
                wall = time_plan(new if name != "baseline" else old, work, sample,
                                 args.scheduler_steps, extra, env)
                walls[name].append(wall)
                print(f"scheduler round {number}: {name:11s} {wall:7.1f} s", file=sys.stderr)
        finally:
            stop_local_head(head)
    median = {name: statistics.median(values) for name, values in walls.items()}
    results["scheduler"] = {
        "plan": "12 tiny runs (stage-1 teachers of 2 domains x 3 seeds, each one's stage-2 "
                "student), --jobs 2 --threads 1",
        "steps_per_run": args.scheduler_steps, "baseline_commit": args.scheduler_baseline,
        "order": order, "wall_s": walls, "median_s": median,
        "ray_over_baseline": median["ray"] / median["baseline"],
        "ray_running_over_baseline": median["ray_running"] / median["baseline"]}
    print(f"scheduler: Ray {median['ray']:.1f} s, Ray already running "
          f"{median['ray_running']:.1f} s, before Ray {median['baseline']:.1f} s "
          f"(x{median['ray'] / median['baseline']:.3f}, "
          f"x{median['ray_running'] / median['baseline']:.3f})", file=sys.stderr)
