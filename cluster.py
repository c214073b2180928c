"""Ray under the study's scheduler: the connection, the checks before anything starts, and the
task that runs one stage command on whichever node Ray picks.

Without an address, ``connect`` starts a local Ray instance of this machine, listening on
127.0.0.1 only; with one (``--address`` or ``RAY_ADDRESS``), it joins that cluster, and refuses
a cluster of other machines that does not use Ray's token authentication (``RAY_AUTH_MODE=token``)
unless the caller accepts the risk: whoever reaches an unauthenticated cluster's ports runs code
on every node. ``check_nodes`` then proves that every node sees the same runs folder (a marker
written here and read back there) and the project (its checkout and interpreter at the same
paths), and names the first node that does not.

``run_stage`` is the Ray task: it runs one stage command as a process of its own session in the
project's folder, its output appended to the job's log. A task that Ray starts again (its node
was lost, or the stage failed) resumes the run from its last checkpoint (``--skip_finished``):
it never restarts a finished run. A stopped task (the scheduler's stop file, or Ray's cancel)
sends SIGTERM to its stage, which stops at a step boundary with its resume state saved.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

# The tries of one run: the first and two more (a lost node, a failed stage). A worker that
# Ray's memory monitor kills is tried again besides, by Ray's own policy for memory kills
# (seen here: seven tries of one run while another process filled the memory), each resuming.
ATTEMPTS = 3
STOP_GRACE_S = 300        # a stopped stage's time to reach a step boundary and save its state
LOCK_WAIT_S = 300         # a retry's wait for the stage of an earlier try to let go of its run
ATTEMPT_HEADER = "== attempt "   # the line each try writes into the job's log before its output
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
FIX_AUTH = ("export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
            "~/.ray/auth_token; README, More machines)")


class ClusterError(Exception):
    """A refusal before any run starts, in one line."""


class StageFailed(Exception):
    """A stage command exited non-zero; Ray starts the task again (the run resumes)."""

    def __init__(self, code: int, last_line: str):
        super().__init__(code, last_line)
        self.code, self.last_line = code, last_line

    def __str__(self):
        return f"exit {self.code}: {self.last_line}"


class StageStopped(Exception):
    """The scheduler asked the stage to stop (stop_file): it got SIGTERM and stopped."""


def stop_file(log_path: str) -> str:
    """The file whose presence asks a job's running task to stop its stage (SIGTERM). The
    scheduler writes it beside the job's log, on the shared folder, so that it reaches any
    node whatever becomes of Ray's own cancel (which a worker may not receive)."""
    return log_path + ".stop"


# --------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------
def address_host(address: str) -> str:
    """The host of 'ray://host:port', 'host:port', '[::1]:port' or 'host'."""
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:rest.index("]")]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def is_local(address: Optional[str]) -> bool:
    """No address (a local instance of its own) or one on this machine's loopback."""
    return address in (None, "", "local") or address_host(address) in LOCAL_HOSTS


def refuse_unauthenticated(address: Optional[str], accept_risk: bool,
                           environ: Optional[Dict[str, str]] = None):
    """ClusterError unless the cluster is on loopback, token authentication is on, or the
    caller accepts the risk."""
    environ = os.environ if environ is None else environ
    if is_local(address) or accept_risk or environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return
    raise ClusterError(
        f"{address}: refusing a Ray cluster of other machines without token authentication "
        f"(whoever reaches its ports runs code on every node): {FIX_AUTH}, or pass "
        f"--allow_unauthenticated_cluster to accept the risk")


@dataclass
class Connection:
    started_here: bool          # a local instance this process started (and shuts down)
    dashboard_url: str = ""

    def close(self):
        import ray
        if self.started_here:
            ray.shutdown()


def connect(address: Optional[str], project_dir: str, num_cpus: Optional[int] = None,
            dashboard_host: str = "127.0.0.1") -> Connection:
    """Ray, ready to run tasks: the running connection of this process if there is one, else
    the cluster at ``address``, else a local instance on 127.0.0.1 with ``num_cpus`` CPUs. The
    workers import this project's modules from ``project_dir`` (the same path on every node)."""
    import ray
    from ray.job_config import JobConfig
    if ray.is_initialized():
        return Connection(started_here=False)
    common = dict(job_config=JobConfig(code_search_path=[project_dir]), log_to_driver=False,
                  logging_level=logging.WARNING)
    try:
        if address in (None, "", "local"):
            context = ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                               dashboard_host=dashboard_host, **common)
            started = True
        else:
            context = ray.init(address=address, **common)
            started = False
    except Exception as error:  # Ray's own: a refused token, no cluster at the address
        text = " ".join(str(error).split()) or type(error).__name__
        token_on = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        # Ray >= 2.5x's `ray start` turns token authentication on by default, and a client
        # without RAY_AUTH_MODE=token only sees that it cannot connect
        named = "auth" in text.lower() or "token" in text.lower()
        hint = f"; {FIX_AUTH}" if named else ""
        if not named and address not in (None, "", "local") and not token_on:
            hint = f"; if the cluster uses token authentication (ray start's default), {FIX_AUTH}"
        raise ClusterError(f"{address or 'a local Ray instance'}: {text[:300]}{hint}") from None
    url = getattr(context, "dashboard_url", "") or ""
    return Connection(started_here=started,
                      dashboard_url=url if not url or "://" in url else f"http://{url}")


def live_nodes() -> List[dict]:
    """The alive nodes of the cluster (Ray's records: NodeID, NodeManagerAddress, ...)."""
    import ray
    return [node for node in ray.nodes() if node.get("Alive")]


def node_label(node: dict) -> str:
    """e.g. '10.0.0.7 (gpu3, 5f1c2a9e)': address, host name, the start of the node id."""
    return (f"{node.get('NodeManagerAddress', '?')} ({node.get('NodeManagerHostname', '?')}, "
            f"{node.get('NodeID', '?')[:8]})")


# --------------------------------------------------------------------------------------------
# The shared folder
# --------------------------------------------------------------------------------------------
def what_a_node_sees(marker: str, project_dir: str, python: str) -> dict:
    """On one node: the marker's content, whether the project and the interpreter are there."""
    try:
        with open(marker, encoding="utf-8") as handle:
            seen = handle.read()
    except OSError as error:
        seen = f"unreadable ({error.strerror or error})"
    return {"marker": seen, "project": os.path.isfile(os.path.join(project_dir, "cluster.py")),
            "python": os.access(python, os.X_OK) or bool(_which(python))}


def _which(program: str) -> Optional[str]:
    import shutil
    return shutil.which(program) if os.sep not in program else None


def check_nodes(root: str, project_dir: str, python: str,
                nodes: Optional[Sequence[dict]] = None, timeout_s: float = 120) -> List[str]:
    """Every node (or those given) reads back a marker written into ``root`` here and finds the
    project and the interpreter at this machine's paths; ClusterError names the first that
    does not. Returns the nodes' labels."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = list(live_nodes() if nodes is None else nodes)
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(os.path.abspath(root), f".ray-check-{uuid.uuid4().hex}")
    token = f"{socket.gethostname()} {uuid.uuid4().hex}"
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write(token)
    see = ray.remote(num_cpus=0, max_retries=0)(what_a_node_sees)
    try:
        refs = [see.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(marker, project_dir, python) for node in nodes]
        for node, ref in zip(nodes, refs):
            try:
                seen = ray.get(ref, timeout=timeout_s)
            except Exception as error:  # e.g. the project's modules do not import there
                if node["NodeID"] not in {n["NodeID"] for n in live_nodes()}:
                    continue  # it left the cluster meanwhile: it gets no run
                raise ClusterError(f"node {node_label(node)} cannot run the project from "
                                   f"{project_dir} ({type(error).__name__}): put the checkout "
                                   f"at the same path on every node") from None
            if seen["marker"] != token:
                what = ("is missing there" if seen["marker"].startswith("unreadable")
                        else "holds something else there")
                raise ClusterError(
                    f"node {node_label(node)} does not see the runs folder {root} that this "
                    f"machine sees (the marker written here {what}): mount the same shared "
                    f"folder at the same path on every node")
            for key, what in (("project", f"the project at {project_dir}"),
                              ("python", f"the interpreter {python}")):
                if not seen[key]:
                    raise ClusterError(f"node {node_label(node)} does not have {what}: the "
                                       f"checkout and its environment must be at the same path "
                                       f"on every node")
    finally:
        with contextlib.suppress(OSError):
            os.remove(marker)
    return [node_label(node) for node in nodes]


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------
def stage_task(cpus: float, gpus: float):
    """run_stage as a Ray task asking for ``cpus`` CPUs and ``gpus`` GPUs (a fraction shares
    one; Ray sets CUDA_VISIBLE_DEVICES), tried up to ATTEMPTS times."""
    import ray
    return ray.remote(run_stage).options(num_cpus=cpus, num_gpus=gpus,
                                         max_retries=ATTEMPTS - 1, retry_exceptions=[StageFailed])


def attempts_so_far(log_path: str) -> int:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            return sum(line.startswith(ATTEMPT_HEADER) for line in handle)
    except FileNotFoundError:
        return 0


def last_line(log_path: str) -> str:
    """The last line that the latest try's stage wrote into the job's log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return "(no log)"
    tries = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT_HEADER)]
    lines = lines[tries[-1] + 1:] if tries else lines
    return lines[-1][:300] if lines else "(no output)"


def resuming(argv: Sequence[str]) -> List[str]:
    """A later try's command: finished runs skipped, interrupted ones resumed, never
    retrained (--overwrite dropped)."""
    argv = [word for word in argv if word != "--overwrite"]
    return argv if "--skip_finished" in argv else argv + ["--skip_finished"]


def _die_with_parent():
    """In the stage's process: SIGTERM when the Ray worker that started it dies (a lost node,
    a killed worker), so that it stops at a step boundary instead of running on unwatched."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for_runs(runs: Sequence[str], log, wait_s: float = LOCK_WAIT_S):
    """Before a try: an earlier try's stage on this machine still holding a run's lock (its
    worker just died; the stage is saving its state) is waited for; a lock of a machine that
    has left the cluster is taken over, since its process cannot be asked."""
    from utils import RunLock
    hosts = None
    for run in runs:
        lock = RunLock(run)
        end = time.time() + wait_s
        while True:
            holder = lock.holder()
            if not holder or not lock._holder_is_live(holder):
                break
            if holder.get("host") != socket.gethostname():
                if hosts is None:
                    hosts = {node.get("NodeManagerHostname") for node in live_nodes()}
                if holder.get("host") not in hosts:
                    log.write(f"{lock.path}: taking over the lock of pid {holder.get('pid')} on "
                              f"{holder.get('host')}, which has left the cluster\n")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(lock.path)
                break
            if time.time() >= end:
                break  # the stage refuses in one line, naming the holder
            time.sleep(1)


def this_node() -> str:
    """The Ray node id of the task calling it."""
    import ray
    return ray.get_runtime_context().get_node_id()


def run_stage(argv: Sequence[str], python: str, cwd: str, log_path: str, runs: Sequence[str],
              threads: Optional[int] = None, stop_grace_s: float = STOP_GRACE_S) -> dict:
    """One stage command, run in ``cwd`` with its output appended to ``log_path``; returns
    the node and the try that ran it. A non-zero exit raises StageFailed (Ray tries again);
    a cancel (KeyboardInterrupt in the task) stops the stage with SIGTERM first."""
    attempt = attempts_so_far(log_path) + 1
    if attempt > 1:
        argv = resuming(argv)
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    host, began = socket.gethostname(), time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"{ATTEMPT_HEADER}{attempt} on {host} (node {this_node()}) at "
                  f"{time.strftime('%F %T')}: {' '.join(argv)}\n")
        log.flush()
        wait_for_runs([os.path.join(cwd, run) for run in runs], log)
        log.flush()
        process = subprocess.Popen([python, *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, preexec_fn=_die_with_parent)
    try:
        code = None
        while code is None:  # short waits: Ray delivers a cancel between Python steps only
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = process.wait(timeout=0.5)
            if code is None and os.path.exists(stop_file(log_path)):
                stop_process(process, stop_grace_s)
                raise StageStopped(last_line(log_path))
    except StageStopped:
        raise
    except BaseException:  # ray.cancel (KeyboardInterrupt), the worker's exit
        stop_process(process, stop_grace_s)
        raise
    if code != 0:
        raise StageFailed(code, last_line(log_path))
    return {"node": host, "attempt": attempt, "started": began, "ended": time.time()}


def stop_process(process: subprocess.Popen, grace_s: float):
    """SIGTERM to the stage's session (it stops at a step boundary), SIGKILL after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
