"""Small helpers every script and tool shares; no torch import (tools that only write text or
JSON start fast).

* atomic files: ``atomic_write_text`` / ``atomic_write_json`` / ``atomic_torch_save`` write to
  a temporary name in the same folder, then rename (nothing half-written after a crash).
* ``RunDir``: one run's folder (resolved config, git commit, results.json, checkpoint names);
  refuses to reuse a folder unless told to resume or overwrite.
* logging: console lines that respect progress bars, and ``train.log`` holding every line of
  the run, those logged before its folder existed included.
* ``main_guard``: expected failures become one line on stderr and exit status 1.

The runtime (seeds, DDP, AMP) is in ``runtime.py``, the training loop in ``training.py``, the
stage skeleton in ``stages.py``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, List, Optional

logger = logging.getLogger("hrkd")


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
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(handle)
    try:
        yield temporary
        # mkstemp makes the file private (0600); give it the mode open() would, so a cluster
        # group can read results and checkpoints as the umask allows.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
        handler = logging.FileHandler(log_file, encoding="utf-8")
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


class RunDir:
    """Paths of one run and the files every stage writes there (rank 0 only writes)."""

    CONFIG, RESULTS, LAST = "config.json", "results.json", "last_checkpoint.pt"

    def __init__(self, path: str, is_main: bool = True):
        self.path = path
        self.is_main = is_main

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def best_model(self, domain: Optional[str] = None) -> str:
        return self.file(best_model_name(domain))

    def prepare_for_training(self, args, dist=None, **facts) -> None:
        """Create the directory; an existing run is only reused with --resume or --overwrite.

        Every rank checks before rank 0 creates anything, so they all decide alike."""
        exists = os.path.isdir(self.path) and os.listdir(self.path)
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
        if exists and args.overwrite:
            shutil.rmtree(self.path)
        os.makedirs(self.path, exist_ok=True)
        config = {"args": vars(args), **facts, "git_commit": git_commit(), "command": sys.argv,
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        name = "config_resumed.json" if args.resume else self.CONFIG
        atomic_write_json(self.file(name), config)

    def update_results(self, **sections):
        """Merge sections (e.g. dev=..., test=...) into results.json atomically."""
        if not self.is_main:
            return
        results = read_json(self.file(self.RESULTS), {})
        results.update(sections)
        atomic_write_json(self.file(self.RESULTS), results)


def main_guard(run: Callable[[], None]) -> int:
    """Run a stage; expected failures become one line on stderr and exit status 1."""
    try:
        run()
        return 0
    except (ValueError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
