"""Small helpers every script and tool shares; no torch import (tools that only write text or
JSON start fast).

* atomic files: ``atomic_write_text`` / ``atomic_write_json`` / ``atomic_torch_save`` write to
  a temporary name in the same folder, then rename (nothing half-written after a crash).
* ``RunDir``: one run's folder (resolved config, git commit, results.json, checkpoint names);
  refuses to reuse a folder unless told to resume or overwrite.
* logging: console lines that respect progress bars, and ``train.log`` holding every line of
  the run, those logged before its folder existed included.
* ``main_guard``: expected failures become one line on stderr and exit status 1; a stop by
  SIGINT / SIGTERM (``RunStopped``) one line and exit status 128 + the signal's number.
* ``run_status``: whether a run finished (the ``finished`` entry of results.json, written
  last), and the run-directory lock (``RunLock``): one process per run directory.
* ``HelpFormatter``: --help that shows every option's default once.
* ``default_cache_dir``: where tokenized features are cached unless --cache_dir says.

The runtime (seeds, DDP, AMP) is in ``runtime.py``, the training loop in ``training.py``, the
stage skeleton in ``stages.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence

logger = logging.getLogger("hrkd")


# --------------------------------------------------------------------------------------------
# A full disk, named as such wherever a write fails
# --------------------------------------------------------------------------------------------
class DiskFullError(OSError):
    """A write failed because the disk (or quota) is full; the message names the file."""

    def __init__(self, path: str):
        super().__init__(disk_full_message(path))
        self.errno, self.filename = errno.ENOSPC, path

    def __str__(self) -> str:
        return self.args[0]


# Below this much free space a failed write counts as a full disk even where the error does
# not say so (torch.save's "[enforce fail at inline_container.cc] ... file write failed").
DISK_FULL_BYTES = 1 << 20


def is_disk_full(err: BaseException, path: str) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, (OSError, RuntimeError)):
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        while folder and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        try:
            return shutil.disk_usage(folder).free < DISK_FULL_BYTES
        except OSError:
            return False
    return False


def disk_full_message(path: str) -> str:
    return (f"{path}: the disk is full (no space left on device); free space, then run the "
            f"same command with --resume (the last good checkpoint is kept)")


@contextlib.contextmanager
def disk_full_guard(path: str, on_error: Optional[Callable[[], None]] = None):
    """A write inside that fails on a full disk raises ``DiskFullError`` naming ``path``
    (one line for the user, instead of an errno or a C++ assertion); ``on_error`` runs on any
    failure first."""
    try:
        yield
    except DiskFullError:
        if on_error:
            on_error()
        raise
    except (OSError, RuntimeError) as err:
        if on_error:
            on_error()
        if is_disk_full(err, path):
            raise DiskFullError(path) from None
        raise


# --------------------------------------------------------------------------------------------
# Atomic files: write to a temporary name in the same directory, then rename.
# --------------------------------------------------------------------------------------------
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_path(path: str):
    directory = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        with disk_full_guard(path):
            os.makedirs(directory, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX,
                                                 suffix=os.path.basename(path))
            os.close(handle)
            yield temporary
            # mkstemp makes the file private (0600); give it the mode open() would, so a
            # cluster group can read results and checkpoints as the umask allows.
            os.chmod(temporary, 0o666 & ~_current_umask())
            os.replace(temporary, path)
    finally:
        if temporary and os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_with(path: str, write: Callable[[str], None]):
    """``write(temporary_path)`` then rename: for writers of their own (safetensors), which
    thereby also get the file mode every other file gets (safetensors alone writes 0600)."""
    with _atomic_path(path) as temporary:
        write(temporary)


def atomic_torch_save(obj, path: str):
    import torch  # here, so that tools writing only text and JSON never import torch
    with _atomic_path(path) as temporary:
        torch.save(obj, temporary)


def atomic_write_text(path: str, text: str):
    with _atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)


def atomic_write_json(path: str, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class _ProgressAwareHandler(logging.StreamHandler):
    """Console lines that go above an active tqdm bar instead of being glued to it."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never stop a run
            self.handleError(record)


class _EarlyRecords(logging.Handler):
    """Keeps what is logged before the run directory exists (checkpoint loading, data), so
    train.log holds the same lines as the console."""

    def __init__(self):
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class _RunLogHandler(logging.FileHandler):
    """train.log. A line that cannot be written (a full disk) is dropped without logging's
    traceback on stderr; the run's next checkpoint or result write then stops it with one
    line saying the disk is full."""

    def handleError(self, record):
        pass


def setup_logging(log_file: Optional[str] = None, main: bool = True):
    """Console logging (rank 0 at INFO); with ``log_file``, also that file, starting with the
    lines logged since the stage began."""
    logger.setLevel(logging.INFO if main else logging.WARNING)
    if not any(isinstance(h, _ProgressAwareHandler) for h in logger.handlers):
        console = _ProgressAwareHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    early = [h for h in logger.handlers if isinstance(h, _EarlyRecords)]
    for handler in [h for h in logger.handlers if isinstance(h, (logging.FileHandler,
                                                                 _EarlyRecords))]:
        logger.removeHandler(handler)  # a previous run in this process, or the buffer
        handler.close()
    if log_file and main:
        handler = _RunLogHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in (early[0].records if early else []):
            handler.handle(record)
        logger.addHandler(handler)
    elif main:
        logger.addHandler(_EarlyRecords())
    # Checkpoint loading logs through modeling's logger; send it to the same place.
    logging.getLogger("modeling").handlers = logger.handlers
    logging.getLogger("modeling").setLevel(logger.level)


def best_model_name(domain: Optional[str] = None) -> str:
    """The checkpoint best on mean dev accuracy, or best on ``domain`` (multi-domain runs):
    the released code's names, read by stage 4, report.py, export.py and predict.py."""
    return "best_model.bin" if domain is None else f"best_model_{domain}.bin"


def domain_of_checkpoint(path: str, domains: List[str]) -> Optional[str]:
    """The domain a best_model_<domain>.bin was chosen on (None for any other file)."""
    name = os.path.basename(path)
    return next((d for d in domains if name == best_model_name(d)), None)


def plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    """'1 step', '2 steps' ('1 process', '2 processes' with ``nouns``)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def default_cache_dir() -> str:
    """The feature (and teacher-target) cache unless --cache_dir says: $HRKD_CACHE_DIR, else
    $XDG_CACHE_HOME/hrkd (~/.cache/hrkd). Not the data folder, which may be read-only or
    shared; the cache keys name the data they came from, so one cache serves every data set."""
    if os.environ.get("HRKD_CACHE_DIR"):
        return os.environ["HRKD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hrkd")


# --------------------------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------
class RunStopped(Exception):
    """A stop asked for by SIGINT or SIGTERM; the exit status is 128 + the signal's number."""

    def __init__(self, signum: int, message: Optional[str] = None, logged: bool = False):
        self.signum = signum
        self.exit_status = 128 + signum
        self.logged = logged  # the message is already on stderr (through the logger)
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


class StopRequests:
    """SIGINT / SIGTERM handlers. Outside a deferred section a signal raises ``RunStopped`` at
    once; inside one (the training loop) it is only recorded, and the loop stops at the next
    step boundary, after saving its resume state."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._deferred = 0

    def _handler(self, signum, frame):
        self.signum = signum
        if not self._deferred:
            raise RunStopped(signum)

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the duration of a stage (the main thread only can have them)."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        self.signum = None
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.signum = None

    @contextlib.contextmanager
    def deferred(self):
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1


STOPS = StopRequests()


# --------------------------------------------------------------------------------------------
# One process per run directory
# --------------------------------------------------------------------------------------------
class RunLocked(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_HELD_LOCKS: dict = {}  # path -> RunLock held by this process


class RunLock:
    """``<run dir>/.lock`` holding the pid, host and start time of the process writing there.

    Taken before anything is written into the directory. A second process is refused, naming
    the holder; a lock whose process is gone (same host, no such pid; or an unreadable file)
    is taken over with a log line. A lock from another host cannot be checked and is refused.
    """

    NAME = ".lock"

    def __init__(self, directory: str):
        self.path = os.path.join(directory, self.NAME)

    def holder(self) -> Optional[dict]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: nobody can hold it

    def _holder_is_live(self, holder: dict) -> bool:
        if not holder or not isinstance(holder.get("pid"), int):
            return False
        if holder.get("host") != socket.gethostname():
            return True
        if holder["pid"] == os.getpid():
            return os.path.abspath(self.path) in _HELD_LOCKS
        return _pid_alive(holder["pid"])

    def _refusal(self, holder: dict) -> RunLocked:
        where = f"pid {holder.get('pid')} on {holder.get('host')}"
        hint = ("delete the lock file if that run is gone" if holder.get("host")
                != socket.gethostname() else "wait for it to finish or stop it")
        return RunLocked(f"{os.path.dirname(self.path)}: in use by {where} (since "
                         f"{holder.get('started', '?')}, lock {self.path}); {hint}")

    def check_free(self):
        """Refuse now if a live process holds the directory (before any other check)."""
        holder = self.holder()
        if holder is not None and self._holder_is_live(holder):
            raise self._refusal(holder)

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds")})
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and self._holder_is_live(holder):
                    raise self._refusal(holder) from None
                logger.warning("%s: taking over a stale lock (%s: no such process)", self.path,
                               f"pid {holder.get('pid')} on {holder.get('host')}" if holder
                               else "unreadable")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            try:
                with disk_full_guard(self.path), os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(record + "\n")
            except OSError:
                with contextlib.suppress(OSError):
                    os.remove(self.path)  # an empty lock file would be taken over anyway
                raise
            _HELD_LOCKS[os.path.abspath(self.path)] = self
            return self
        raise RunLocked(f"{self.path}: could not take the lock")

    def release(self):
        if _HELD_LOCKS.pop(os.path.abspath(self.path), None) is None:
            return
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


TEMPORARY_PREFIX = ".tmp-"   # _atomic_path's files before their rename


def remove_orphaned_files(folder: str):
    """Half-written files (``.tmp-*``) that a killed process left in a run directory; called
    by the lock's holder, so no live writer owns them."""
    for name in os.listdir(folder):
        if name.startswith(TEMPORARY_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def remove_dead_builds(folder: str):
    """Cache entries built under ``<key>.tmp-<pid>`` by a process of this machine that is gone
    (killed before its rename): they would never be finished or removed otherwise."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        stem, _, pid = name.rpartition(".tmp-")
        if stem and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def release_locks():
    """Release every run-directory lock this process holds (the end of a stage, any path)."""
    for lock in list(_HELD_LOCKS.values()):
        lock.release()


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------
def run_status(path: str, need_test: bool = False) -> dict:
    """{"state": "finished" | "running" | "incomplete" | "missing", "step", "total_steps"}.

    A run is finished only when results.json holds ``finished`` (written last, after the
    final evaluation and, with --do_test, the test); with ``need_test`` its test must have
    run too. A run whose lock a live process holds is running; anything else with a
    results.json or a resume state is incomplete."""
    results = read_json(os.path.join(path, RunDir.RESULTS), None)
    lock = RunLock(path)
    holder = lock.holder()
    running = holder is not None and lock._holder_is_live(holder) and not (
        holder.get("pid") == os.getpid())
    if results is None and not os.path.isfile(os.path.join(path, RunDir.LAST)) and not running:
        return {"state": "missing"}
    results = results or {}
    finished = results.get("finished")
    dev = results.get("dev", {})
    last = results.get("stopped") or {"step": dev.get("last_step"),
                                      "total_steps": dev.get("total_steps")}
    # the step the resume state holds, written after it (a kill between the evaluation's
    # results and its resume state leaves the earlier one: that is where a resume starts)
    step = results.get("resume_step", last.get("step"))
    status = {"step": step, "total_steps": last.get("total_steps")}
    if finished and (finished.get("tested") or not need_test):
        return {"state": "finished", **status}
    return {"state": "running" if running else "incomplete", **status}


def describe_status(status: dict) -> str:
    if status["state"] not in ("incomplete", "running"):
        return status["state"]
    total = f" of {status['total_steps']}" if status.get("total_steps") else ""
    if status["state"] == "running":
        at = "" if status.get("step") is None else f" (last evaluation at step {status['step']}{total})"
        return f"running{at}"
    if status.get("step") is None:
        return "incomplete (no evaluation yet)"
    return f"incomplete: stopped at step {status['step']}{total}"


class RunDir:
    """Paths of one run and the files every stage writes there (rank 0 only writes)."""

    CONFIG, RESULTS, LAST = "config.json", "results.json", "last_checkpoint.pt"
    TIMING = "timing.json"  # how long the training process took (PROVENANCE_FILES)

    def __init__(self, path: str, is_main: bool = True, nested: Sequence[str] = ()):
        self.path = path
        self.is_main = is_main
        # sub-folders that are runs of their own (Meta-KD's first phase): not this run's files
        self.nested = tuple(nested)
        self.created = False  # by this process (so a run stopped before starting leaves nothing)
        self.lock: Optional[RunLock] = None
        self.training_since: Optional[float] = None  # time.monotonic() at write_config
        self.resumed = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def best_model(self, domain: Optional[str] = None) -> str:
        return self.file(best_model_name(domain))

    def _contents(self) -> List[str]:
        if not os.path.isdir(self.path):
            return []
        return [name for name in os.listdir(self.path)
                if name != RunLock.NAME and name not in self.nested]

    def take_lock(self):
        """Rank 0 locks the directory (refusing if another process holds it)."""
        if self.is_main and self.lock is None:
            if not os.path.isdir(self.path) or (self.nested and not self._contents()):
                self.created = True
            self.lock = RunLock(self.path).acquire()

    def prepare_for_training(self, args, dist=None, **facts) -> None:
        """Lock and create the directory; an existing run is only reused with --resume or
        --overwrite.

        Every rank checks before rank 0 creates anything, so they all decide alike."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotADirectoryError(f"--output_dir {self.path}: a file, not a directory")
        RunLock(self.path).check_free()
        exists = bool(self._contents())
        if exists and self.never_started():
            # killed (kill -9, a lost machine) before its first checkpoint, its process gone
            # (the lock is free): nothing in it can be continued or reported, so it starts over
            if self.is_main:
                print(f"starting afresh: {self.path} (its run stopped before its first "
                      f"checkpoint)", file=sys.stderr)
            args.resume, args.overwrite = False, True
        if args.resume and not exists:
            # a run that never began (one variant of several, say): --resume starts it
            if self.is_main:
                print(f"starting: {self.path} (nothing to resume there)", file=sys.stderr)
            args.resume = False
        if args.resume:
            if not os.path.isfile(self.file(self.LAST)):
                raise FileNotFoundError(f"{self.file(self.LAST)}: nothing to resume from")
        elif exists and not args.overwrite:
            raise FileExistsError(f"{self.path}: run directory exists; pass --resume to "
                                  f"continue it or --overwrite to replace it")
        if dist is not None:
            dist.barrier()
        if not self.is_main:
            return
        self.take_lock()
        remove_orphaned_files(self.path)
        if exists and args.overwrite:
            for name in self._contents():
                target = self.file(name)
                shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) \
                    else os.remove(target)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        if args.resume:
            self.clear_status()
            # config.json says what the run trains with now; each resume is recorded in it
            # (when, how, and the settings it changed, accepted by --allow_changed_settings)
            config = read_json(self.file(self.CONFIG), {}) or {}
            config.setdefault("resumes", []).append({
                "started": now, "command": sys.argv, "git_commit": git_commit(),
                "changed": list(getattr(args, "changed_settings", []) or [])})
            config["args"] = vars(args)
            config.update(facts)
        else:
            config = {"args": vars(args), **facts, "git_commit": git_commit(),
                      "command": sys.argv, "started": now}
        atomic_write_json(self.file(self.CONFIG), config)
        self.training_since, self.resumed = time.monotonic(), bool(args.resume)

    def never_started(self) -> bool:
        """Files but neither a resume state nor results: a run that stopped (was killed)
        before its first checkpoint. Copies of finished runs (results.json) are not this."""
        return (bool(self._contents()) and not os.path.isfile(self.file(self.LAST))
                and not os.path.isfile(self.file(self.RESULTS)))

    def discard_if_unstarted(self):
        """A run this process created that stopped before its first resume state leaves
        nothing behind (a rerun is then not blocked by a folder --resume cannot continue)."""
        if self.is_main and self.created and not os.path.isfile(self.file(self.LAST)):
            self.release_lock()
            if self.nested:  # the nested runs stay (they have their own resume state)
                for name in self._contents():
                    target = self.file(name)
                    shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) \
                        else os.remove(target)
            else:
                shutil.rmtree(self.path, ignore_errors=True)
            self.created = False

    def release_lock(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def update_results(self, **sections):
        """Merge sections (e.g. dev=..., test=...) into results.json atomically."""
        if not self.is_main:
            return
        results = read_json(self.file(self.RESULTS), {})
        results.update(sections)
        atomic_write_json(self.file(self.RESULTS), results)

    def clear_status(self):
        """A run that trains again is neither stopped nor finished until it says so again."""
        results = read_json(self.file(self.RESULTS), None)
        if self.is_main and results and ({"finished", "stopped"} & set(results)):
            results.pop("finished", None)
            results.pop("stopped", None)
            atomic_write_json(self.file(self.RESULTS), results)

    def mark_finished(self, train_steps: Optional[int], tested: bool):
        """The completion marker: results.json's ``finished`` entry, written last, atomically
        (what SKIP_FINISHED, --skip_finished, report.py and the study scripts trust). A run this
        process trained also gets timing.json first: its start, end and wall seconds."""
        # No timestamp in results.json: it is the same however often a run is rerun. The wall
        # time goes beside it, in a file of its own that survives a git clone (a file's
        # modification time does not), for plan.py's estimates and RESULTS.md's wall times.
        if self.is_main and self.training_since is not None:
            config = read_json(self.file(self.CONFIG), {}) or {}
            atomic_write_json(self.file(self.TIMING), {
                "started": config.get("started"),
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - self.training_since, 1),
                "resumed": self.resumed, "train_steps": train_steps,
                "machine": config.get("machine")})
        self.update_results(finished={"train_steps": train_steps, "tested": bool(tested)})

    def status(self, need_test: bool = False) -> dict:
        return run_status(self.path, need_test)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help showing each option's default once: appended unless the help already names it,
    the option is required (said instead) or a plain on/off flag, or it has no default. Options
    without a help text get a line for their default too."""

    def _format_action(self, action):
        # an on/off flag's default (True for a --no_x flag) would read as "this flag is on"
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if not action.help and action.option_strings and not switch and (
                action.required or action.default not in (None, argparse.SUPPRESS)):
            import copy
            action = copy.copy(action)
            action.help = "(required)" if action.required else "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings:
            return text if "(required)" in text else f"{text} (required)".strip()
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS)
                or not action.option_strings or isinstance(
                    action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
            else action.default
        return f"{text} (default: {value})".strip()


def main_guard(run: Callable[[], None]) -> int:
    """Run a stage; expected failures become one line on stderr and exit status 1; a stop by
    SIGINT / SIGTERM one line (no traceback) and exit status 130 / 143."""
    try:
        run()
        return 0
    except RunStopped as stop:
        if not stop.logged:
            print(f"{stop}", file=sys.stderr)
        return stop.exit_status
    except (ValueError, OSError, RuntimeError) as err:
        if isinstance(err, OSError) and not isinstance(err, DiskFullError) and err.errno in (
                errno.ENOSPC, errno.EDQUOT):  # a write outside the guarded ones
            err = DiskFullError(err.filename or "a file")
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1


# The small files of a finished run that are kept in the repository (results/): enough for
# report.py to remake every table and plot without the weights.
PROVENANCE_FILES = ("results.json", "config.json", "timing.json", "domain_weights.jsonl",
                    "deployment.json")


def collect_finished(root: str, dest: str) -> List[str]:
    """Copy the PROVENANCE_FILES of every finished run under ``root`` (tested, unless it ran
    without --do_test: a tuning run) to ``dest``, keeping the run layout; returns the runs
    copied."""
    copied = []
    for folder, subfolders, files in os.walk(root):
        if RunDir.RESULTS not in files:
            continue
        subfolders[:] = []
        # a dev-only run (tuning: DO_TEST=0) is finished without a test
        config = read_json(os.path.join(folder, RunDir.CONFIG), {}) or {}
        need_test = config.get("args", {}).get("do_test", True)
        if run_status(folder, need_test=need_test)["state"] != "finished":
            continue
        target = os.path.join(dest, os.path.relpath(folder, root))
        for name in PROVENANCE_FILES:
            if name in files:
                os.makedirs(target, exist_ok=True)
                shutil.copyfile(os.path.join(folder, name), os.path.join(target, name))
        copied.append(os.path.relpath(folder, root))
    return sorted(copied)


def main(argv=None) -> int:
    """``python utils.py finished RUN_DIR [--tested]``: exit 0 when the run finished (the
    launchers' SKIP_FINISHED asks this, without importing torch); ``status RUN_DIR...``
    prints each run's state; ``collect ROOT DEST`` copies every finished run's small files
    (PROVENANCE_FILES: results.json, config.json, timing.json, ...) into DEST, e.g. results/."""
    parser = argparse.ArgumentParser(description="run-directory status")
    parser.add_argument("command", choices=["finished", "status", "collect"])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tested", action="store_true", help="the run's test must have run")
    args = parser.parse_args(argv)
    if args.command == "collect":
        if len(args.runs) != 2:
            parser.error("collect takes ROOT DEST")
        for run in collect_finished(*args.runs):
            print(run)
        return 0
    statuses = [run_status(run, args.tested) for run in args.runs]
    if args.command == "status":
        for run, status in zip(args.runs, statuses):
            print(f"{run}\t{describe_status(status)}")
        return 0
    return 0 if all(s["state"] == "finished" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
