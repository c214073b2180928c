"""scheduler.py: the study's commands in parallel, each after its teachers, small files kept.

The order and the dependencies are checked on the real dry runs of reproduce_amazon.sh; the
running (Ray tasks on a local instance of one CPU: a failure's retries and dependants, the
deadline, a stop, the mirror) with a stand-in interpreter that writes what a finished run
writes, so no model trains here. That one process per domain or variant gives the same runs as
one process for all is tested in test_stages.py; real stages on a two-node cluster, a lost node
and token authentication in test_ray_cluster.py.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import cluster
import scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(step, tmp_path, **env):
    values = dict(os.environ, PYTHON="echo", OUT_ROOT=str(tmp_path / "runs"),
                  SEEDS="42 43", AMAZON_DIR=str(tmp_path))
    values.update(env)
    result = subprocess.run(["bash", "reproduce.sh", "amazon", step], cwd=ROOT, env=values,
                            capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def family(job):
    """The run family of a job's first output (train_domain, labels_only_domain, ...)."""
    parts = job.outputs()[0].split(os.sep)
    return parts[parts.index("amazon") - 1]


def test_table_plan_split_and_linked(tmp_path):
    jobs = scheduler.read_plan(dry_run("table", tmp_path))
    assert {job.script for job in jobs} == set(scheduler.STAGE_SCRIPTS)  # report/TF-IDF left out
    jobs = scheduler.link([part for job in jobs for part in scheduler.split_job(job)],
                          str(tmp_path / "runs"))
    # per seed: 4 teachers, stage 3, 4 students, 4 variants, mix, 4 + 1 labels-only, the
    # meta-teacher and its 4 Meta-KD students
    assert len(jobs) == 2 * 24
    for job in jobs:
        assert len(job.values("--domain")) <= 1 and len(job.values("--variant")) <= 1
        assert "{" not in " ".join(job.outputs())
        seed = job.value("--seed")
        deps = [jobs[d] for d in job.deps]
        if family(job) == "finetune_domain":
            assert [(family(d), d.value("--domain"), d.value("--seed")) for d in deps] == [
                ("train_domain", job.value("--domain"), seed)]
        elif family(job) == "finetune_multi_domain":
            assert [(family(d), d.value("--seed")) for d in deps] == [
                ("train_multi_domain", seed)]
        elif family(job) == "finetune_metakd":   # every domain's student: the one teacher
            assert [(family(d), d.value("--seed")) for d in deps] == [
                ("train_meta_teacher", seed)]
        else:
            assert deps == [], job.name
    # stage 3 carries the longest chain (stage 4's students wait on it): it goes first
    first = max(jobs, key=lambda job: job.chain)
    assert family(first) == "train_multi_domain"
    assert all(job.name.startswith(f"{index:03d}_") for index, job in enumerate(jobs))
    assert len({job.name for job in jobs}) == len(jobs)


def test_fewshot_students_wait_on_their_ratio_s_teachers(tmp_path):
    jobs = scheduler.read_plan(dry_run("fewshot", tmp_path, FEWSHOT_STEPS="7", SEEDS="42",
                                       FEWSHOT_PERCENTS="2 5"))
    jobs = scheduler.link([part for job in jobs for part in scheduler.split_job(job)])
    students = [job for job in jobs if job.script.startswith("finetune")]
    assert students and all(job.value("--max_steps") == "7" for job in jobs)
    ratio = re.compile(r"/fewshot/p\d+/")
    for job in students:
        assert len(job.deps) == 1
        teacher = jobs[job.deps[0]]
        assert ratio.search(teacher.outputs()[0])[0] == ratio.search(job.outputs()[0])[0]


STAND_IN = textwrap.dedent("""\
    #!{python}
    # Stands in for the interpreter: "runs" a stage by writing what a finished run writes.
    import json, os, signal, sys, time
    sys.path.insert(0, {root!r})
    from plan import flag_values
    args = sys.argv[2:]
    values = lambda flag: flag_values(args, flag)  # noqa: E731
    def stopped(signum, frame):
        open({log!r} + ".stopped", "a").write(" ".join(args) + "\\n")
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stopped)
    domains = values("--domain") or [None]
    for domain in domains:
        out = values("--output_dir")[0].replace("{{domain}}", domain or "").replace(
            "{{variant}}", (values("--variant") or [""])[0])
        teacher = values("--teacher_dir")
        if teacher and not os.path.isfile(
                os.path.join(teacher[0].replace("{{domain}}", domain or ""), "results.json")):
            sys.exit(4)  # started before its teacher finished
        if "--skip_finished" in args and os.path.isfile(os.path.join(out, "results.json")):
            continue  # as the stages do: a finished run is left alone
        with open({log!r}, "a") as log:
            log.write(f"{{time.time()}} {{out}} {{' '.join(args)}}\\n")
        if "slow" in (domain or ""):
            time.sleep(60)
        if "fail" in (domain or ""):
            sys.exit(f"error: {{out}} fails here")
        if domain == "flaky" and not os.path.exists(out + ".tried"):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            open(out + ".tried", "w").close()
            sys.exit(3)
        os.makedirs(out, exist_ok=True)
        json.dump({{"args": {{"do_test": True}}}}, open(os.path.join(out, "config.json"), "w"))
        open(os.path.join(out, "best_model.bin"), "w").write("weights")
        json.dump({{"finished": {{"tested": True}}}}, open(os.path.join(out, "results.json"), "w"))
    """)


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python"
    path.write_text(STAND_IN.format(python=sys.executable, root=ROOT,
                                    log=str(tmp_path / "started.log")))
    path.chmod(0o755)
    return str(path)


def write_plan(path, root, lines):
    path.write_text("== a header the dry run prints\n" + "".join(
        line.replace("R/", f"{root}/") + "\n" for line in lines))
    return str(path)


def states(logs):
    """{job: state} of schedule.tsv."""
    rows = (logs / "schedule.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["job", "started", "ended", "wall_s", "exit", "state", "node",
                                    "tries", "command"]
    return {row.split("\t")[0]: row.split("\t")[5] for row in rows[1:]}


def started(tmp_path):
    """The output folders the stand-in began, in order."""
    return [line.split()[1] for line in (tmp_path / "started.log").read_text().splitlines()]


def test_runs_after_teachers_skips_a_failure_s_dependants_and_keeps_small_files(
        tmp_path, stand_in, local_ray, capsys):
    runs, mirror, logs = tmp_path / "runs", tmp_path / "mirror", tmp_path / "logs"
    plan = write_plan(tmp_path / "table.plan", runs, [
        "train_domain.py --domain a b fail --output_dir R/t/{domain}/seed1",
        "finetune_domain.py --domain a b fail --teacher_dir R/t/{domain}/seed1 "
        "--output_dir R/s/{domain}/seed1",
        "report.py --runs R/"])
    code = scheduler.main([plan, "--split", "--jobs", "3", "--python", stand_in,
                           "--log_dir", str(logs), "--root", str(runs), "--mirror", str(mirror)])
    assert code == 1
    kept = sorted(os.path.relpath(os.path.join(d, f), mirror)
                  for d, _, files in os.walk(mirror) for f in files)
    assert kept == [f"{stage}/{domain}/seed1/{name}" for stage in ("s", "t")
                    for domain in ("a", "b") for name in ("config.json", "results.json")]
    assert sorted(states(logs).values()) == ["done"] * 4 + ["failed"]  # s/fail never started
    assert not (runs / "s" / "fail").exists()
    # three tries, the later ones resuming (--skip_finished); reported with the log's last line
    log = (logs / "002_t.fail.seed1.log").read_text()
    assert log.startswith("train_domain.py --domain fail")
    tries = [line for line in log.splitlines() if line.startswith("== attempt ")]
    assert [line.split(" on ")[0] for line in tries] == [f"== attempt {n}" for n in (1, 2, 3)]
    assert [line.endswith("--skip_finished") for line in tries] == [False, True, True]
    assert started(tmp_path).count(f"{runs}/t/fail/seed1") == 3
    out = capsys.readouterr().out
    assert f"failed 002_t.fail.seed1 (" in out and \
        f"exit 1, 3 tries): error: {runs}/t/fail/seed1 fails here" in out
    assert "left (2; the same command resumes them): 002_t.fail.seed1 005_s.fail.seed1" in out


def test_a_flaky_run_is_tried_again_and_resumes(tmp_path, stand_in, local_ray):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", runs, [
        "train_domain.py --domain flaky --overwrite --output_dir R/t/{domain}/seed1"])
    assert scheduler.main([plan, "--python", stand_in, "--log_dir", str(logs),
                           "--root", str(runs)]) == 0
    assert states(logs) == {"000_t.flaky.seed1": "done"}
    row = (logs / "schedule.tsv").read_text().splitlines()[1].split("\t")
    assert row[6] and row[7] == "2"   # the node, the second try
    second = (tmp_path / "started.log").read_text().splitlines()[1]
    assert second.endswith("/seed1 --skip_finished") and "--overwrite" not in second


def test_deadline_stops_running_jobs(tmp_path, stand_in, local_ray):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", runs, [
        "train_domain.py --domain slow --output_dir R/t/{domain}/seed1",
        "finetune_domain.py --domain slow --teacher_dir R/t/{domain}/seed1 "
        "--output_dir R/s/{domain}/seed1"])
    began = time.time()
    code = scheduler.main([plan, "--python", stand_in, "--log_dir", str(logs),
                           "--deadline_s", "4"])
    assert code == 1 and time.time() - began < 30
    assert list(states(logs).values()) == ["stopped"]
    # the stage got SIGTERM (it stops at a step boundary), not a kill
    assert (tmp_path / "started.log.stopped").read_text().startswith("--domain slow")


def test_sigterm_stops_the_running_stages_and_says_what_is_left(tmp_path, stand_in, local_ray,
                                                                 capsys):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", runs, [
        "train_domain.py --domain slow --output_dir R/t/{domain}/seed1",
        "finetune_domain.py --domain slow --teacher_dir R/t/{domain}/seed1 "
        "--output_dir R/s/{domain}/seed1"])
    timer = threading.Timer(4, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    began = time.time()
    try:
        code = scheduler.main([plan, "--python", stand_in, "--log_dir", str(logs)])
    finally:
        timer.cancel()
    assert code == 1 and time.time() - began < 30
    assert list(states(logs).values()) == ["stopped"]
    assert (tmp_path / "started.log.stopped").is_file()
    out = capsys.readouterr().out
    assert "SIGTERM: stopping 1 running run(s)" in out
    assert "left (2; the same command resumes them): 000_runs.t.slow.seed1 001_runs.s.slow.seed1" \
        in out


def test_gives_up_when_the_first_jobs_all_fail(tmp_path, stand_in, local_ray):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", runs, [
        "train_domain.py --domain fail1 fail2 slow --output_dir R/t/{domain}/seed1"])
    began = time.time()
    code = scheduler.main([plan, "--split", "--jobs", "1", "--python", stand_in,
                           "--log_dir", str(logs), "--give_up_after", "2"])
    assert code == 1 and time.time() - began < 30
    assert sorted(states(logs).values()) == ["failed", "failed"]
    assert f"{runs}/t/slow/seed1" not in started(tmp_path)


def test_a_dead_raylet_ends_the_call_instead_of_failing_every_run(tmp_path, capsys):
    """Ray gone from this machine (`ray stop` by someone else, a killed instance): the run it
    held is recorded as stopped, not failed, and no other run is started."""
    import ray.exceptions
    jobs = scheduler.link(scheduler.read_plan([
        f"train_domain.py --output_dir {tmp_path}/runs/a",
        f"train_domain.py --output_dir {tmp_path}/runs/b"]))
    sched = scheduler.Scheduler(jobs, 1, sys.executable, str(tmp_path / "logs"))
    os.makedirs(sched.log_dir)
    sched.state[0], sched.started[0] = "running", time.time()
    sched.finish(0, ray.exceptions.LocalRayletDiedError())
    assert sched.state == ["stopped", "waiting"]
    assert sched.stop_reason == "Ray's local raylet died"
    assert "stopped 000_" in capsys.readouterr().out


def test_earlier_plans_first(tmp_path, stand_in, local_ray):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    later = write_plan(tmp_path / "fewshot.plan", runs, [
        "train_multi_domain.py --num_train_epochs 30 --output_dir R/few/m/seed1"])
    first = write_plan(tmp_path / "table.plan", runs, [
        "train_domain.py --domain a --output_dir R/t/{domain}/seed1"])
    assert scheduler.main([first, later, "--jobs", "1", "--python", stand_in,
                           "--log_dir", str(logs)]) == 0
    assert started(tmp_path) == [f"{runs}/t/a/seed1", f"{runs}/few/m/seed1"]


@pytest.mark.parametrize("order, expected", [
    ("chain", ["t/a", "t/b", "s/a", "s/b"]),      # both teachers first: the longer chains
    ("students", ["t/a", "s/a", "t/b", "s/b"]),   # a teacher's student before the next teacher
])
def test_order_of_ready_jobs(tmp_path, stand_in, local_ray, order, expected):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "table.plan", runs, [
        "train_domain.py --domain a b --output_dir R/t/{domain}/seed1",
        "finetune_domain.py --domain a b --teacher_dir R/t/{domain}/seed1 "
        "--output_dir R/s/{domain}/seed1"])
    assert scheduler.main([plan, "--split", "--jobs", "1", "--python", stand_in,
                           "--log_dir", str(logs), "--order", order]) == 0
    assert [os.path.relpath(path, runs).rsplit("/", 1)[0] for path in started(tmp_path)] == \
        expected


def test_reproduce_with_jobs_runs_the_stages_through_the_scheduler(tmp_path, sample, ray_token):
    # the stand-in fakes the stage scripts; the rest (utils.py, data_processing.py, TF-IDF,
    # report.py) runs on the real interpreter against the generated reviews
    real = tmp_path / "python"
    real.write_text(STAND_IN.format(python=sys.executable, root=ROOT,
                                    log=str(tmp_path / "started.log")).replace(
        "\nargs = sys.argv[2:]",
        "\nif os.path.basename(sys.argv[1]) not in ('train_domain.py', 'train_multi_domain.py',"
        " 'finetune_domain.py', 'finetune_multi_domain.py'):\n"
        "    os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
        "args = sys.argv[2:]"))
    assert "os.execv" in real.read_text()
    real.chmod(0o755)
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHON=str(real), OUT_ROOT=str(out), SEEDS="42", JOBS="2",
               FEWSHOT_PERCENTS="50", FEWSHOT_STEPS="2", AMAZON_DIR=sample["amazon"])
    result = subprocess.run(["bash", "reproduce_amazon.sh", "fewshot"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "== 2 processes at a time, 1 thread(s) each" in result.stdout
    rows = (out / "schedule" / "logs" / "schedule.tsv").read_text().splitlines()[1:]
    # 4 teachers, the multi-domain teacher, 4 students, multi-domain KD and HRKD: each once,
    # by the scheduler; the sequential pass after it found them finished
    assert len(rows) == 11 and {row.split("\t")[5] for row in rows} == {"done"}
    assert len((tmp_path / "started.log").read_text().splitlines()) == 11
    assert (out / "fewshot" / "p50" / "tfidf" / "amazon" / "books" / "results.json").is_file()
    # then the step as usual: its plan says all is finished, TF-IDF runs, report.py last
    assert "stage 1: single-domain teachers: 4 of 4 runs finished" in result.stdout
    # report.py last: the stand-ins write no test scores, so the few-shot table holds TF-IDF alone
    table = (out / "report" / "fewshot_amazon.md").read_text()
    assert result.stdout.rstrip().endswith("scikit-learn on the CPU (4 runs)")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| Training data | TF-IDF + logistic regression |", table
    assert len(rows) == 2 and rows[1].startswith("| 50% | "), table


def test_reproduce_refuses_a_bad_jobs_value_before_writing(tmp_path):
    result = subprocess.run(["bash", "reproduce_amazon.sh", "table"], cwd=ROOT, text=True,
                            capture_output=True, env=dict(os.environ, JOBS="two",
                                                          OUT_ROOT=str(tmp_path / "runs")))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: JOBS=two: a number of processes at a time (1 or more)"
    assert not (tmp_path / "runs").exists()

@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--mirror", "m"], "--mirror needs --root"),
])
def test_bad_flags(tmp_path, capsys, argv, message):
    plan = write_plan(tmp_path / "p.plan", tmp_path, ["train_domain.py --output_dir R/x"])
    assert scheduler.main([plan, "--log_dir", str(tmp_path / "l"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_without_stage_commands(tmp_path, capsys):
    plan = write_plan(tmp_path / "p.plan", tmp_path, ["report.py --runs x"])
    assert scheduler.main([plan, "--log_dir", str(tmp_path / "l")]) == 2
    assert f"{plan}: no stage command" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()


def test_gpu_study_run_without_the_pack_says_so_and_writes_nothing(tmp_path):
    pack = tmp_path / "pack"
    result = subprocess.run(["bash", "gpu_study.sh", "run"], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, WORK=str(tmp_path / "w"),
                                                OUT=str(tmp_path / "o"), PACK=str(pack)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: {pack}/: no packed weights or reviews (bash gpu_study.sh pack, then carry '
        f'["{pack}"])']
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("address, local", [
    (None, True), ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True),
    ("ray://127.0.0.1:10001", True), ("10.0.0.7:6379", False), ("head.lab:6379", False),
    ("ray://head.lab:10001", False), ("auto", False)])
def test_which_addresses_are_local(address, local):
    assert cluster.is_local(address) is local


def test_a_cluster_of_other_machines_needs_token_authentication(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    plan = write_plan(tmp_path / "p.plan", tmp_path, ["train_domain.py --output_dir R/x"])
    assert scheduler.main([plan, "--log_dir", str(tmp_path / "l"),
                           "--address", "10.0.0.7:6379"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: 10.0.0.7:6379: refusing a Ray cluster of other machines without token "
                   "authentication (whoever reaches its ports runs code on every node): export "
                   "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
                   "~/.ray/auth_token; README, More machines), or pass "
                   "--allow_unauthenticated_cluster to accept the risk"]
    assert not (tmp_path / "l").exists()
    cluster.refuse_unauthenticated("10.0.0.7:6379", accept_risk=True)   # the flag accepts it
    cluster.refuse_unauthenticated("10.0.0.7:6379", False, {"RAY_AUTH_MODE": "token"})


def test_a_cluster_that_cannot_be_reached_is_one_line_with_the_token_hint(monkeypatch):
    """`ray start` turns token authentication on by default (Ray 2.60), and a client without
    RAY_AUTH_MODE=token learns only that it cannot connect: the line says what to try."""
    import ray

    def refused(**_kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6390")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(cluster.ClusterError) as error:
        cluster.connect("127.0.0.1:6390", ROOT)
    assert str(error.value) == (
        "127.0.0.1:6390: Failed to connect to Ray cluster at 127.0.0.1:6390; if the cluster "
        "uses token authentication (ray start's default), export RAY_AUTH_MODE=token and the "
        "cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token; README, More machines)")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")   # already on: the cause lies elsewhere
    with pytest.raises(cluster.ClusterError) as error:
        cluster.connect("127.0.0.1:6390", ROOT)
    assert str(error.value) == "127.0.0.1:6390: Failed to connect to Ray cluster at 127.0.0.1:6390"


def test_a_retry_waits_for_its_earlier_stage_and_takes_over_a_lost_node_s_lock(tmp_path,
                                                                                monkeypatch):
    """cluster.wait_for_runs before a try: a lock of this machine's live process is waited for
    (up to the limit); one of a host that has left the cluster is removed; one of a host still
    in it is left for the stage to refuse, naming its holder."""
    import io
    import socket
    monkeypatch.setattr(cluster, "live_nodes", lambda: [{"NodeManagerHostname": "gpu2"}])
    runs = {name: tmp_path / name for name in ("here", "lost", "alive")}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for name, host, pid in (("here", socket.gethostname(), holder.pid),
                                ("lost", "gpu9", 1234), ("alive", "gpu2", 1234)):
            runs[name].mkdir()
            (runs[name] / ".lock").write_text(json.dumps({"pid": pid, "host": host}))
        log = io.StringIO()
        began = time.time()
        cluster.wait_for_runs([str(path) for path in runs.values()], log, wait_s=1.5)
        assert 1.5 <= time.time() - began < 10
    finally:
        holder.kill()
        holder.wait()
    assert (runs["here"] / ".lock").exists() and (runs["alive"] / ".lock").exists()
    assert not (runs["lost"] / ".lock").exists()
    assert log.getvalue() == (f"{runs['lost']}/.lock: taking over the lock of pid 1234 on gpu9, "
                              f"which has left the cluster\n")
