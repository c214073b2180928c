"""scheduler.py on a real Ray cluster of this machine: a head without CPUs and two nodes of one
CPU each (ray.cluster_utils.Cluster, on 127.0.0.1 in the session's loopback-only network
namespace), with token authentication on.

A tiny plan of real stages (a stage-1 teacher and its stage-2 student, a stage-3 teacher and its
stage-4 student, on the generated reviews) gives on the cluster exactly the runs that the same
commands give in one process; with the node that runs the stage-3 teacher removed mid-run, the
run resumes on the other node and still gives them. A node that sees another runs folder (a
tmpfs mounted over it in a mount namespace of its own) is refused before anything starts, and
a client without the cluster's token is refused while one with it runs a plan.
"""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

import scheduler
from conftest import ROOT, tiny_teacher_args

SCRIPTS = ("train_domain.py", "finetune_domain.py", "train_multi_domain.py",
           "finetune_multi_domain.py")
HELD_STEP = 3   # the lost-node test's stage-3 teacher holds here (its checkpoint: step 2)


def plan_commands(sample, root):
    """The four runs (script, args) of the tiny plan, their folders below ``root``."""
    student = ["--task", "amazon", "--data_dir", sample["amazon"], "--student_config",
               "tiny_student", "--max_seq_length", "32", "--batch_size", "4", "--max_steps",
               "4", "--val_freq", "2", "--no_progress", "--do_train", "--do_test"]
    multi = tiny_teacher_args(sample, f"{root}/t3", 6, "--val_freq", "2", "--do_train",
                              "--do_test")
    del multi[multi.index("--domain"):multi.index("--domain") + 2]   # every domain
    return [
        ("train_domain.py", tiny_teacher_args(sample, f"{root}/t1", 4, "--val_freq", "2",
                                              "--do_train", "--do_test")),
        ("finetune_domain.py", student + ["--domain", "books", "--teacher_dir", f"{root}/t1",
                                          "--output_dir", f"{root}/s2"]),
        ("train_multi_domain.py", multi),
        ("finetune_multi_domain.py", student + ["--teacher_dir", f"{root}/t3",
                                                "--output_dir", f"{root}/s4"]),
    ]


def write_plan(path, commands):
    path.write_text("".join(" ".join(shlex.quote(w) for w in [script, *args]) + "\n"
                            for script, args in commands))
    return str(path)


def results(root):
    return {name: json.loads((root / name / "results.json").read_text())
            for name in ("t1", "s2", "t3", "s4")}


@pytest.fixture(scope="module")
def one_process(sample, tmp_path_factory):
    """The plan's runs made by calling each stage's main in this process, in order."""
    import importlib
    root = tmp_path_factory.mktemp("one_process")
    for script, args in plan_commands(sample, root):
        assert importlib.import_module(script[:-3]).main(args) == 0, script
    return results(root)


@pytest.fixture(scope="module")
def two_nodes(ray_token, tmp_path_factory):
    """The cluster, this process connected to it; the lost-node test's run holds at
    HELD_STEP (the nodes' workers inherit HRKD_HOLD_*)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.job_config import JobConfig
    held = tmp_path_factory.mktemp("lost_node") / "runs" / "t3"
    os.environ.update(HRKD_HOLD_AT_STEP=str(HELD_STEP), HRKD_HOLD_RUN=str(held))
    ip = {"node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, **ip})
    nodes = [cluster.add_node(num_cpus=1, **ip) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             job_config=JobConfig(code_search_path=[ROOT]))
    yield cluster, nodes, held.parent
    ray.shutdown()
    cluster.shutdown()
    for name in ("HRKD_HOLD_AT_STEP", "HRKD_HOLD_RUN"):
        os.environ.pop(name, None)


def schedule(logs):
    rows = [row.split("\t") for row in (logs / "schedule.tsv").read_text().splitlines()[1:]]
    return {row[0]: row for row in rows}


def tries(log_path):
    """(node id, output after the header) of each try in a job's log."""
    text = log_path.read_text()
    parts = text.split("\n== attempt ")[1:]
    return [(part.split("(node ", 1)[1].split(")", 1)[0], part) for part in parts]


def test_two_nodes_run_the_plan_as_one_process_does(sample, one_process, two_nodes, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(ROOT)
    root, logs = tmp_path / "runs", tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", plan_commands(sample, root))
    assert scheduler.main([plan, "--root", str(root), "--log_dir", str(logs)]) == 0
    assert results(root) == one_process
    rows = schedule(logs)
    assert sorted(rows) == ["000_t1", "001_s2", "002_t3", "003_s4"]
    assert {row[5] for row in rows.values()} == {"done"}
    # each student began after its teacher ended (the order kept), and both nodes worked
    assert rows["001_s2"][1] >= rows["000_t1"][2] and rows["003_s4"][1] >= rows["002_t3"][2]
    nodes = {tries(logs / f"{name}.log")[0][0] for name in rows}
    assert nodes == {node.node_id for node in two_nodes[1]}


def test_a_node_that_sees_another_folder_is_refused(two_nodes, tmp_path, monkeypatch, capsys):
    """A third node whose runs folder is a tmpfs of its own: the check names it, nothing runs."""
    import ray
    monkeypatch.chdir(ROOT)
    cluster = two_nodes[0]
    root = tmp_path / "runs"
    root.mkdir()
    before = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    other = subprocess.Popen(
        ["unshare", "-m", "--", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(root),
         ray_cli, "start", "--block", f"--address={cluster.address}", "--num-cpus=1",
         "--node-ip-address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        end = time.time() + 60
        while not ({node["NodeID"] for node in ray.nodes() if node["Alive"]} - before):
            assert other.poll() is None and time.time() < end, other.stderr.read()
            time.sleep(0.5)
        new = ({node["NodeID"] for node in ray.nodes() if node["Alive"]} - before).pop()
        plan = write_plan(tmp_path / "p.plan", [("train_domain.py", ["--output_dir",
                                                                     f"{root}/never"])])
        code = scheduler.main([plan, "--root", str(root), "--log_dir", str(tmp_path / "logs")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert err == [f"error: node 127.0.0.1 ({os.uname().nodename}, {new[:8]}) does not see "
                       f"the runs folder {root} that this machine sees (the marker written "
                       f"here is missing there): mount the same shared folder at the same "
                       f"path on every node"]
        assert os.listdir(root) == []   # nothing ran, the marker is gone
    finally:
        os.killpg(other.pid, 15)
        other.wait(timeout=60)
        end = time.time() + 60
        while any(node["Alive"] for node in ray.nodes() if node["NodeID"] not in before):
            assert time.time() < end
            time.sleep(0.5)


def test_a_lost_node_s_run_resumes_on_the_other(sample, one_process, two_nodes, tmp_path,
                                               monkeypatch):
    """The stage-3 teacher holds at step HELD_STEP; its node is then removed: Ray runs the
    task again on the other node, which resumes the run (not restarts it)."""
    import threading

    import ray
    monkeypatch.chdir(ROOT)
    cluster, nodes, root = two_nodes
    logs = tmp_path / "logs"
    plan = write_plan(tmp_path / "p.plan", plan_commands(sample, root))
    removed = []

    def remove_the_held_node():
        held, end = root / "t3" / ".held", time.time() + 120
        while not held.exists() and time.time() < end:
            time.sleep(0.2)
        node_id = tries(logs / "002_t3.log")[0][0]
        node = next(node for node in nodes if node.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node_id)

    remover = threading.Thread(target=remove_the_held_node, daemon=True)
    remover.start()
    assert scheduler.main([plan, "--root", str(root), "--log_dir", str(logs),
                           "--deadline_s", "600"]) == 0
    remover.join(timeout=5)
    assert removed
    assert results(root) == one_process
    held = tries(logs / "002_t3.log")
    assert [node for node, _ in held][0] == removed[0] != held[-1][0]
    assert "resuming (incomplete: " in held[-1][1] and "step 2 of 6)" in held[-1][1]
    assert schedule(logs)["002_t3"][5] == "done"
    end = time.time() + 60   # the cluster has seen the node go before the next test
    while any(node["NodeID"] == removed[0] and node["Alive"] for node in ray.nodes()):
        assert time.time() < end
        time.sleep(0.5)


def test_a_client_without_the_token_is_refused_and_one_with_it_runs(two_nodes, tmp_path,
                                                                     ray_token):
    cluster = two_nodes[0]
    runs = tmp_path / "runs"
    stand_in = tmp_path / "python"   # "runs" a stage: writes a finished run's marker
    stand_in.write_text(f"#!{sys.executable}\nimport os, sys\n"
                        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
                        "os.makedirs(out, exist_ok=True)\n"
                        "open(os.path.join(out, 'results.json'), 'w').write('{}')\n")
    stand_in.chmod(0o755)
    plan = write_plan(tmp_path / "p.plan", [("train_domain.py", ["--output_dir",
                                                                 f"{runs}/a"])])
    argv = [sys.executable, "scheduler.py", plan, "--python", str(stand_in), "--root",
            str(runs), "--log_dir", str(tmp_path / "logs"), "--address", cluster.address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")   # no token here, none in ~/.ray
    refused = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {cluster.address}: ")
    assert "RAY_AUTH_TOKEN" in refused.stderr and not runs.exists()
    env["RAY_AUTH_TOKEN"] = ray_token
    allowed = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert allowed.returncode == 0, allowed.stderr
    assert (runs / "a" / "results.json").is_file()
