"""scheduler.py: the study's commands in parallel, each after its teachers, small files kept.

The order and the dependencies are checked on the real dry runs of reproduce_amazon.sh; the
running (parallelism, a failure's dependants, the deadline, the mirror) with a stand-in
interpreter that writes what a finished run writes, so no model trains here. That one process
per domain or variant gives the same runs as one process for all is tested in test_stages.py.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

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
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from plan import flag_values
    args = sys.argv[2:]
    values = lambda flag: flag_values(args, flag)  # noqa: E731
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
        with open(os.environ["STAND_IN_LOG"], "a") as log:
            log.write(f"{{time.time()}} {{out}}\\n")
        if "slow" in out:
            time.sleep(60)
        if "fail" in out:
            sys.exit(3)
        os.makedirs(out, exist_ok=True)
        json.dump({{"args": {{"do_test": True}}}}, open(os.path.join(out, "config.json"), "w"))
        open(os.path.join(out, "best_model.bin"), "w").write("weights")
        json.dump({{"finished": {{"tested": True}}}}, open(os.path.join(out, "results.json"), "w"))
    """)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    path = tmp_path / "python"
    path.write_text(STAND_IN.format(python=sys.executable, root=ROOT))
    path.chmod(0o755)
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "started.log"))
    return str(path)


def write_plan(path, root, lines):
    path.write_text("== a header the dry run prints\n" + "".join(
        line.replace("R/", f"{root}/") + "\n" for line in lines))
    return str(path)


def test_runs_after_teachers_skips_a_failure_s_dependants_and_keeps_small_files(
        tmp_path, stand_in):
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
    rows = (logs / "schedule.tsv").read_text().splitlines()
    states = {row.split("\t")[0]: row.split("\t")[5] for row in rows[1:]}
    assert sorted(states.values()) == ["done"] * 4 + ["failed"]  # s/fail never started
    assert not (runs / "s" / "fail").exists()
    assert (logs / "002_t.fail.seed1.log").read_text().startswith("train_domain.py --domain fail")


def test_deadline_stops_running_jobs(tmp_path, stand_in):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", runs, [
        "train_domain.py --domain slow --output_dir R/t/{domain}/seed1",
        "finetune_domain.py --domain slow --teacher_dir R/t/{domain}/seed1 "
        "--output_dir R/s/{domain}/seed1"])
    began = time.time()
    code = scheduler.main([plan, "--python", stand_in, "--log_dir", str(logs),
                           "--deadline_s", "2"])
    assert code == 1 and time.time() - began < 30
    rows = (logs / "schedule.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[5] for row in rows] == ["stopped"]


def test_gives_up_when_the_first_jobs_all_fail(tmp_path, stand_in):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", runs, [
        "train_domain.py --domain fail1 fail2 slow --output_dir R/t/{domain}/seed1"])
    began = time.time()
    code = scheduler.main([plan, "--split", "--jobs", "3", "--python", stand_in,
                           "--log_dir", str(logs), "--give_up_after", "2"])
    assert code == 1 and time.time() - began < 30
    rows = (logs / "schedule.tsv").read_text().splitlines()[1:]
    assert sorted(row.split("\t")[5] for row in rows) == ["failed", "failed", "stopped"]


def test_earlier_plans_first(tmp_path, stand_in):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    later = write_plan(tmp_path / "fewshot.plan", runs, [
        "train_multi_domain.py --num_train_epochs 30 --output_dir R/few/m/seed1"])
    first = write_plan(tmp_path / "table.plan", runs, [
        "train_domain.py --domain a --output_dir R/t/{domain}/seed1"])
    assert scheduler.main([first, later, "--jobs", "1", "--python", stand_in,
                           "--log_dir", str(logs)]) == 0
    order = [line.split()[1] for line in (tmp_path / "started.log").read_text().splitlines()]
    assert order == [f"{runs}/t/a/seed1", f"{runs}/few/m/seed1"]



@pytest.mark.parametrize("order, expected", [
    ("chain", ["t/a", "t/b", "s/a", "s/b"]),      # both teachers first: the longer chains
    ("students", ["t/a", "s/a", "t/b", "s/b"]),   # a teacher's student before the next teacher
])
def test_order_of_ready_jobs(tmp_path, stand_in, order, expected):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "table.plan", runs, [
        "train_domain.py --domain a b --output_dir R/t/{domain}/seed1",
        "finetune_domain.py --domain a b --teacher_dir R/t/{domain}/seed1 "
        "--output_dir R/s/{domain}/seed1"])
    assert scheduler.main([plan, "--split", "--jobs", "1", "--python", stand_in,
                           "--log_dir", str(logs), "--order", order]) == 0
    started = [line.split()[1] for line in (tmp_path / "started.log").read_text().splitlines()]
    assert [os.path.relpath(path, runs).rsplit("/", 1)[0] for path in started] == expected


def test_reproduce_with_jobs_runs_the_stages_through_the_scheduler(tmp_path, sample):
    # the stand-in fakes the stage scripts; the rest (utils.py, data_processing.py, TF-IDF,
    # report.py) runs on the real interpreter against the generated reviews
    real = tmp_path / "python"
    real.write_text(STAND_IN.format(python=sys.executable, root=ROOT).replace(
        "\nargs = sys.argv[2:]",
        "\nif os.path.basename(sys.argv[1]) not in ('train_domain.py', 'train_multi_domain.py',"
        " 'finetune_domain.py', 'finetune_multi_domain.py'):\n"
        "    os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
        "args = sys.argv[2:]"))
    assert "os.execv" in real.read_text()
    real.chmod(0o755)
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHON=str(real), OUT_ROOT=str(out), SEEDS="42", JOBS="2",
               FEWSHOT_PERCENTS="50", FEWSHOT_STEPS="2", AMAZON_DIR=sample["amazon"],
               STAND_IN_LOG=str(tmp_path / "started.log"))
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
