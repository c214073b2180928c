"""The one training / evaluation loop of all four stages, and what it stands on.

* ``add_common_args``: the flags every stage shares (data, sizes, optimisation, AMP, run dir).
* ``Distributed``: torchrun / DDP set-up (LOCAL_RANK from the environment; rank 0 writes).
* ``RunDir``: the run directory (resolved config, git commit, log, tensorboard, results.json,
  checkpoints written atomically); refuses to reuse a directory unless told to.
* ``build_optimizer`` / ``linear_warmup_schedule``: AdamW with the spec's no-decay groups and
  linear warm-up then linear decay to 0.
* ``Stage`` + ``train``: the loop (AMP, gradient clipping, dev evaluation every ``val_freq``
  steps, best overall and best per-domain checkpoints, resumable state, non-finite guard).
* ``evaluate`` / ``run_test``: accuracy per domain; test with each domain's best checkpoint.

Importing this module has no side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

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
# Flags shared by every stage
# --------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, lr: float, epochs: float, batch_size: int):
    """Flags of every stage; ``lr``, ``epochs`` and ``batch_size`` are the stage's paper values."""
    data = parser.add_argument_group("data")
    data.add_argument("--task", required=True, choices=["mnli", "amazon"])
    data.add_argument("--data_dir", required=True,
                      help="MNLI: the folder of train.tsv/dev_matched.tsv; Amazon: the folder "
                           "of the domain folders")
    data.add_argument("--domain", required=True,
                      help="stages 1-2: the domain to train on; stages 3-4: the fit domain, whose "
                           "data sets the epoch (ceil(n_fit / batch) steps) while the other "
                           "domains cycle (books for Amazon, telephone for MNLI)")
    data.add_argument("--vocab_file", default=None,
                      help="default: vocab.txt next to the initial checkpoint")
    data.add_argument("--max_seq_length", type=int, default=128)
    data.add_argument("--train_ratio", type=float, default=0.9,
                      help="fraction of each genre's train.tsv rows used for training "
                           "(few-shot: 0.9 x p)")
    data.add_argument("--dev_ratio", type=float, default=0.1)
    data.add_argument("--data_seed", type=int, default=42,
                      help="seed of the one-time Amazon shuffle (splits do not follow --seed)")
    data.add_argument("--cache_dir", default=None,
                      help="feature cache (default: <data_dir>/cache)")
    data.add_argument("--no_lowercase", dest="lowercase", action="store_false")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=batch_size,
                       help="examples per step per process (per domain in stages 3-4)")
    optim.add_argument("--eval_batch_size", type=int, default=64)
    optim.add_argument("--learning_rate", type=float, default=lr)
    optim.add_argument("--num_train_epochs", type=float, default=epochs)
    optim.add_argument("--max_steps", type=int, default=0,
                       help="stop after this many steps (0: the epochs decide)")
    optim.add_argument("--warmup_proportion", type=float, default=0.1)
    optim.add_argument("--weight_decay", type=float, default=0.01)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--val_freq", type=int, default=50, help="dev evaluation every N steps")
    optim.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    optim.add_argument("--max_nonfinite_steps", type=int, default=10,
                       help="stop after this many consecutive steps with a non-finite loss")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="the run directory")
    run.add_argument("--do_train", action="store_true")
    run.add_argument("--do_test", action="store_true",
                     help="evaluate each domain's best checkpoint on its test set")
    run.add_argument("--overwrite", action="store_true",
                     help="delete an existing run directory before training")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output_dir from its last checkpoint")
    run.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")


def add_switch(parser, name: str, default: bool, help_text: str):
    """--name / --no_name, defaulting to ``default``."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", default=default,
                        help=f"{help_text} (default: {'on' if default else 'off'})")
    parser.add_argument(f"--no_{name}", dest=name, action="store_false")


# The shortest input that still holds a token of each text of a pair.
MIN_SEQ_LENGTH = 5


def validate_common_args(args):
    """Out-of-range flags stop before anything is read or written."""
    for name in ("train_ratio", "dev_ratio"):
        value = getattr(args, name)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--{name} must be in (0, 1], got {value}")
    for name in ("batch_size", "eval_batch_size", "max_seq_length", "val_freq", "learning_rate",
                 "max_grad_norm"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_seq_length < MIN_SEQ_LENGTH:
        raise ValueError(f"--max_seq_length must be at least {MIN_SEQ_LENGTH} ([CLS] a [SEP] b "
                         f"[SEP] with one token each), got {args.max_seq_length}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must not be negative, got {args.weight_decay}")
    if args.num_train_epochs <= 0 and args.max_steps <= 0:
        raise ValueError("--num_train_epochs or --max_steps must be positive")
    if not (args.do_train or args.do_test):
        raise ValueError("nothing to do: pass --do_train and/or --do_test")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    blocks = getattr(args, "student_init_layers", None)
    if blocks and not getattr(args, "student_init", None):
        raise ValueError("--student_init_layers needs --student_init (the checkpoint to copy "
                         "the blocks from)")


# Flags that name a checkpoint or a config: each also takes a packaged checkpoint's name.
CHECKPOINT_FLAGS = ("init_checkpoint", "model_config", "student_init", "student_config")


def resolve_checkpoint_flags(args):
    """Replace packaged checkpoint names (all-MiniLM-L6-v2) by their installed folder, so the
    run's config.json records the files actually read."""
    from modeling import checkpoint_path
    for name in CHECKPOINT_FLAGS:
        if getattr(args, name, None):
            setattr(args, name, checkpoint_path(getattr(args, name)))


def check_sequence_length(config, max_seq_length: int, what: str):
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the {what}'s "
                         f"max_position_embeddings ({config.max_position_embeddings})")


def default_vocab(args, init_path: Optional[str]) -> str:
    """--vocab_file, else vocab.txt beside the initial checkpoint."""
    if args.vocab_file:
        return args.vocab_file
    if init_path:
        folder = init_path if os.path.isdir(init_path) else os.path.dirname(init_path)
        return os.path.join(folder, "vocab.txt")
    raise ValueError("--vocab_file is needed when no initial checkpoint directory is given")


def main_guard(run: Callable[[], None]) -> int:
    """Run a stage; expected failures become one line on stderr and exit status 1."""
    try:
        run()
        return 0
    except (ValueError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------------
# Seeds, devices, distributed
# --------------------------------------------------------------------------------------------
def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Distributed:
    """torchrun-aware process group; a plain single process when WORLD_SIZE is unset."""

    def __init__(self, timeout_minutes: float = 30.0):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # A bounded timeout: a rank that dies makes the others fail instead of hanging.
            torch.distributed.init_process_group(
                backend, timeout=datetime.timedelta(minutes=timeout_minutes))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def close(self):
        """Wait for rank 0 (it may still be testing). The group itself is left by
        ``leave_process_group`` once the stage's models are gone."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.barrier()


def leave_process_group():
    """Destroy the process group after everything that holds its pending work is freed.

    DDP's reducer and gloo's work objects keep tensors; if they outlive the group into
    interpreter shutdown, gloo's threads can abort the process ("terminate called without an
    active exception", SIGABRT) after the run finished its work. So: collect them first, then
    destroy the group while the interpreter is fully alive, on every exit path."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------
def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 only (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------
def _no_decay(name: str) -> bool:
    """Biases and LayerNorm weights are not decayed (BERT's recipe)."""
    return name.endswith("bias") or "layernorm" in name.lower()


def build_optimizer(modules: Dict[str, nn.Module], lr: float, weight_decay: float):
    """AdamW (0.9, 0.999, 1e-8) over the named modules' trainable parameters."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                (no_decay if _no_decay(f"{prefix}.{name}") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def linear_warmup_schedule(optimizer, total_steps: int, warmup_proportion: float):
    """Linear warm-up over the first ``warmup_proportion`` of steps, then linear decay to 0."""
    warmup = int(total_steps * warmup_proportion)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


class RunDir:
    """Paths of one run and the files every stage writes there (rank 0 only writes)."""

    CONFIG, RESULTS, LAST = "config.json", "results.json", "last_checkpoint.pt"

    def __init__(self, path: str, is_main: bool = True):
        self.path = path
        self.is_main = is_main

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def best_model(self, domain: Optional[str] = None) -> str:
        return self.file("best_model.bin" if domain is None else f"best_model_{domain}.bin")

    def prepare_for_training(self, args, dist: Optional["Distributed"] = None) -> None:
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
        config = {"args": vars(args), "git_commit": git_commit(), "command": sys.argv,
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


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """On GPU: pinned host memory and asynchronous copies, so the copy overlaps compute."""
    if device.type != "cuda":
        return {name: tensor.to(device) for name, tensor in batch.items()}
    return {name: tensor.pin_memory().to(device, non_blocking=True)
            for name, tensor in batch.items()}


@torch.inference_mode()
def predict_logits(model: nn.Module, features: Dict[str, torch.Tensor], domain: Optional[int],
                   batch_size: int, device: torch.device, amp: str = "off") -> torch.Tensor:
    """Logits of every example of ``features`` with the head of ``domain`` (None: one head)."""
    was_training = model.training
    model.eval()
    outputs = []
    count = features["input_ids"].shape[0]
    for start in range(0, count, batch_size):
        batch = to_device({k: v[start:start + batch_size].long() for k, v in features.items()
                           if k != "labels"}, device)
        with autocast(device, amp):
            # Only logits are needed: every block runs the fused kernel, no fit maps.
            out = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                        domain=domain, score_layers=(), fit=False)
        outputs.append(out.logits.float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else 0.0


def evaluate(model: nn.Module, features_by_domain: Dict[str, Dict[str, torch.Tensor]],
             head_of: Dict[str, Optional[int]], batch_size: int, device: torch.device,
             amp: str = "off") -> Dict[str, float]:
    """Accuracy per domain, each with its own head."""
    return {domain: accuracy(predict_logits(model, features, head_of[domain], batch_size,
                                            device, amp), features["labels"])
            for domain, features in features_by_domain.items()}


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """What differs between the stages; the loop does the rest.

    compute_loss(model, batches) gets the trained model (DDP-wrapped when distributed) and one
    batch dict per domain (on the device), and returns a dict of named losses whose "loss"
    entry is optimised. ``extra_modules`` (e.g. the graph) are saved in every checkpoint and
    their trainable parameters join the model's optimiser when ``optimise_extra``;
    ``extra_state`` holds other objects with state_dict/load_state_dict (e.g. a meta-learner)
    that the resume state carries.
    """

    model: nn.Module
    domains: List[str]
    fit_domain: str
    train_features: Dict[str, Dict[str, torch.Tensor]]
    dev_features: Dict[str, Dict[str, torch.Tensor]]
    head_of: Dict[str, Optional[int]]
    compute_loss: Callable[[nn.Module, List[Dict[str, torch.Tensor]]], Dict[str, torch.Tensor]]
    checkpoint_meta: dict
    extra_modules: Dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    optimise_extra: bool = True
    extra_state: Dict[str, object] = dataclasses.field(default_factory=dict)
    # Called on rank 0 at every evaluation with (step, tensorboard writer or None); returns
    # entries for results.json's "dev" section.
    on_evaluation: Optional[Callable[[int, object], dict]] = None


@dataclasses.dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_mean: float = -1.0
    best_step: int = -1
    best_per_domain: Dict[str, float] = dataclasses.field(default_factory=dict)
    best_step_per_domain: Dict[str, int] = dataclasses.field(default_factory=dict)
    nonfinite_run: int = 0


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32),
                         state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_checkpoint(stage: Stage, state: TrainState, metrics: Dict[str, float]) -> dict:
    """What a best_model*.bin holds: weights, the config to rebuild them, metadata."""
    model = unwrap(stage.model)
    content = {"state_dict": model.state_dict(), "config": model.config.to_dict(),
               "model_args": model.model_args(), "step": state.global_step,
               "epoch": state.epoch, "metrics": dict(metrics), **stage.checkpoint_meta}
    for name, module in stage.extra_modules.items():
        content[f"{name}_state_dict"] = module.state_dict()
    return content


def summary_writer(path: str):
    """tensorboardX's writer (requirements.txt), or PyTorch's where only tensorboard exists."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(path)


def _log_scalars(writer, prefix: str, values: Dict[str, float], step: int):
    if writer is None:
        return
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", float(value), step)


def train(args, stage: Stage, run: RunDir, dist: Distributed):
    """Train ``stage`` as ``args`` says; writes checkpoints, logs and dev results into ``run``."""
    from data_processing import MultiDomainBatchSampler, take
    from tqdm import tqdm

    device = dist.device
    sizes = [stage.train_features[d]["labels"].shape[0] for d in stage.domains]
    sampler = MultiDomainBatchSampler(sizes, args.batch_size, stage.domains.index(stage.fit_domain),
                                      args.seed, dist.rank, dist.world_size)
    total_steps = (args.max_steps if args.max_steps > 0
                   else math.ceil(len(sampler) * args.num_train_epochs))
    model = dist.wrap(stage.model.to(device))
    stage.model = model
    modules = {"model": unwrap(model), **(stage.extra_modules if stage.optimise_extra else {})}
    optimizer = build_optimizer(modules, args.learning_rate, args.weight_decay)
    scheduler = linear_warmup_schedule(optimizer, total_steps, args.warmup_proportion)
    scaler = make_scaler(device, args.amp)
    state = TrainState()
    if args.resume:
        state = _restore(run, stage, optimizer, scheduler, scaler)
    writer = None
    if dist.is_main:
        writer = summary_writer(run.file("tensorboard"))
    logger.info("training %s on %s: %d steps (%d per epoch), batch %d x %d domain(s) x %d "
                "process(es)", type(unwrap(model)).__name__, ",".join(stage.domains),
                total_steps, len(sampler), args.batch_size, len(stage.domains), dist.world_size)
    parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not dist.is_main
                    or args.no_progress, desc="train", dynamic_ncols=True)
    model.train()
    for module in stage.extra_modules.values():
        module.train()
    while state.global_step < total_steps:
        for indices in sampler.epoch(state.epoch, state.step_in_epoch):
            batches = [to_device(take(stage.train_features[d], idx), device)
                       for d, idx in zip(stage.domains, indices)]
            with autocast(device, args.amp):
                losses = stage.compute_loss(model, batches)
            _optimisation_step(args, losses["loss"], optimizer, scheduler, scaler, parameters,
                               state, dist, stage.extra_modules if stage.optimise_extra else {})
            state.global_step += 1
            state.step_in_epoch += 1
            _injected_fault(state.global_step, dist.rank)
            progress.update(1)
            if dist.is_main:
                scalars = {k: float(v.detach()) for k, v in losses.items()}
                scalars["lr"] = scheduler.get_last_lr()[0]
                _log_scalars(writer, "train", scalars, state.global_step)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}")
            finished = state.global_step >= total_steps
            if state.global_step % args.val_freq == 0 or finished:
                _evaluate_and_save(args, stage, run, dist, state, writer, optimizer, scheduler,
                                   scaler)
            if finished:
                break
        else:
            state.epoch += 1
            state.step_in_epoch = 0
    progress.close()
    if writer is not None:
        writer.close()
    check_replicas_agree(unwrap(model), dist)
    return state


def _injected_fault(step: int, rank: int):
    """Fault injection for the reliability tests: HRKD_KILL_AT_STEP=N [HRKD_KILL_RANK=r]
    SIGKILLs the process right after optimisation step N (on rank r only, if given)."""
    target = os.environ.get("HRKD_KILL_AT_STEP")
    if not target or int(target) != step:
        return
    if os.environ.get("HRKD_KILL_RANK", str(rank)) == str(rank):
        os.kill(os.getpid(), 9)


def weights_digest(module: nn.Module) -> str:
    """SHA-1 over a module's weights (names and exact bytes)."""
    import hashlib
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(model: nn.Module, dist: Distributed):
    """After DDP training every rank must hold the same weights; stop loudly if not."""
    if not dist.enabled:
        return
    digests = [None] * dist.world_size
    torch.distributed.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the trained weights: {digests}")
    logger.info("identical weights on all %d ranks (sha1 %s)", dist.world_size, digests[0][:12])


def _optimisation_step(args, loss, optimizer, scheduler, scaler, parameters, state: TrainState,
                       dist: Distributed, extra_modules: Dict[str, nn.Module]):
    """Backward, unscale, clip, step; a non-finite loss skips the update."""
    if not torch.isfinite(loss.detach()):
        state.nonfinite_run += 1
        logger.warning("step %d: non-finite loss (%s), update skipped", state.global_step + 1,
                       float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        if state.nonfinite_run >= args.max_nonfinite_steps:
            raise RuntimeError(f"{state.nonfinite_run} consecutive non-finite losses at step "
                               f"{state.global_step + 1}; stopping (the last good checkpoint "
                               f"is kept)")
        scheduler.step()
        return
    state.nonfinite_run = 0
    scaler.scale(loss).backward()
    _average_extra_gradients(dist, extra_modules)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _average_extra_gradients(dist: Distributed, extra_modules: Dict[str, nn.Module]):
    """DDP averages the wrapped model's gradients; trainable extra modules (a trained graph)
    are outside it, so average theirs here to keep the ranks' copies identical."""
    if not dist.enabled:
        return
    for module in extra_modules.values():
        for parameter in module.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= dist.world_size


def _evaluate_and_save(args, stage: Stage, run: RunDir, dist: Distributed, state: TrainState,
                       writer, optimizer, scheduler, scaler):
    """Dev accuracy per domain; keep the best overall and per-domain checkpoints; resume state."""
    if dist.is_main:
        dev = evaluate(unwrap(stage.model), stage.dev_features, stage.head_of,
                       args.eval_batch_size, dist.device, args.amp)
        mean = float(np.mean(list(dev.values())))
        _log_scalars(writer, "dev", {**dev, "mean": mean}, state.global_step)
        extra = stage.on_evaluation(state.global_step, writer) if stage.on_evaluation else {}
        if mean > state.best_mean:
            state.best_mean, state.best_step = mean, state.global_step
            atomic_torch_save(model_checkpoint(stage, state, dev), run.best_model())
        if len(stage.domains) > 1:
            for domain, value in dev.items():
                if value > state.best_per_domain.get(domain, -1.0):
                    state.best_per_domain[domain] = value
                    state.best_step_per_domain[domain] = state.global_step
                    atomic_torch_save(model_checkpoint(stage, state, dev),
                                      run.best_model(domain))
        else:
            state.best_per_domain = {stage.domains[0]: state.best_mean}
            state.best_step_per_domain = {stage.domains[0]: state.best_step}
        logger.info("step %d dev %s mean %.4f (best %.4f at step %d)", state.global_step,
                    " ".join(f"{d}={v:.4f}" for d, v in dev.items()), mean, state.best_mean,
                    state.best_step)
        run.update_results(dev={"best_mean": state.best_mean, "best_step": state.best_step,
                                "best_per_domain": state.best_per_domain,
                                "best_step_per_domain": state.best_step_per_domain,
                                "last": dev, "last_step": state.global_step, **extra})
        _save_resume_state(run, stage, state, optimizer, scheduler, scaler)
    dist.barrier()


def _save_resume_state(run: RunDir, stage: Stage, state: TrainState, optimizer, scheduler,
                       scaler):
    content = {"model": unwrap(stage.model).state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
               "rng": _rng_state(), "train_state": dataclasses.asdict(state),
               "extra": {name: m.state_dict() for name, m in stage.extra_modules.items()},
               "extra_state": {name: o.state_dict() for name, o in stage.extra_state.items()}}
    atomic_torch_save(content, run.file(RunDir.LAST))


def _restore(run: RunDir, stage: Stage, optimizer, scheduler, scaler) -> TrainState:
    from modeling import safe_torch_load
    content = safe_torch_load(run.file(RunDir.LAST))
    unwrap(stage.model).load_state_dict(content["model"])
    optimizer.load_state_dict(content["optimizer"])
    scheduler.load_state_dict(content["scheduler"])
    scaler.load_state_dict(content["scaler"])
    for name, module in stage.extra_modules.items():
        module.load_state_dict(content["extra"][name])
    for name, stateful in stage.extra_state.items():
        stateful.load_state_dict(content["extra_state"][name])
    _set_rng_state(content["rng"])
    state = TrainState(**content["train_state"])
    logger.info("resumed from %s at step %d", run.file(RunDir.LAST), state.global_step)
    return state


# --------------------------------------------------------------------------------------------
# Test
# --------------------------------------------------------------------------------------------
def run_test(args, run: RunDir, domains: List[str], head_of: Dict[str, Optional[int]],
             test_features: Dict[str, Dict[str, torch.Tensor]],
             dev_features: Dict[str, Dict[str, torch.Tensor]], device: torch.device,
             load_model: Callable[[str], nn.Module]) -> Dict[str, dict]:
    """Test (and dev) accuracy of each domain with that domain's best checkpoint.

    Single-domain runs use best_model.bin; multi-domain runs best_model_<domain>.bin, plus the
    best-overall checkpoint for the "overall" row.
    """
    test, dev, overall_test = {}, {}, {}
    for domain in domains:
        path = run.best_model(domain if len(domains) > 1 else None)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no checkpoint for domain '{domain}'; train first")
        model = load_model(path).to(device)
        one = {domain: test_features[domain]}
        test.update(evaluate(model, one, head_of, args.eval_batch_size, device, args.amp))
        dev.update(evaluate(model, {domain: dev_features[domain]}, head_of,
                            args.eval_batch_size, device, args.amp))
    if len(domains) > 1:
        model = load_model(run.best_model()).to(device)
        overall_test = evaluate(model, test_features, head_of, args.eval_batch_size, device,
                                args.amp)
    summary = {"per_domain": test, "mean": float(np.mean(list(test.values()))),
               "dev_per_domain": dev}
    if overall_test:
        summary["best_overall_checkpoint"] = overall_test
    run.update_results(test=summary)
    logger.info("test %s mean %.4f", " ".join(f"{d}={v:.4f}" for d, v in test.items()),
                summary["mean"])
    return summary


# --------------------------------------------------------------------------------------------
# Set-up shared by the stage scripts
# --------------------------------------------------------------------------------------------
def load_features(args, domains: Sequence[str], tokenizer, dist: Distributed):
    """{domain: {split: tensors}} for the stage's domains (cached on disk)."""
    from data_processing import load_domain_features
    cache_dir = args.cache_dir or os.path.join(args.data_dir, "cache")
    features = {domain: load_domain_features(args.task, args.data_dir, domain, tokenizer,
                                             args.max_seq_length, args.train_ratio,
                                             args.dev_ratio, args.data_seed, cache_dir, dist)
                for domain in domains}
    for domain, splits in features.items():
        for split, tensors in splits.items():
            if tensors["labels"].shape[0] == 0:
                raise ValueError(f"{args.data_dir}: domain '{domain}' has no {split} examples")
    return features


def split_of(features, split: str) -> Dict[str, Dict[str, torch.Tensor]]:
    return {domain: splits[split] for domain, splits in features.items()}


def copy_vocab(vocab_file: str, run: RunDir):
    """Keep the vocabulary beside the checkpoints, so a run directory is self-contained."""
    if run.is_main:
        shutil.copyfile(vocab_file, run.file("vocab.txt"))


def freeze(model: nn.Module, amp: str = "off") -> nn.Module:
    """A teacher: eval mode (no dropout), no gradients.

    Under ``--amp bf16|fp16`` its linear layers are stored in that precision once: autocast
    casts them to it on every call anyway (it caches casts only of weights that need gradients),
    so the results are bit for bit the same and each step saves a cast of every teacher weight.
    Everything else (embeddings, LayerNorms) stays fp32, as autocast would use it."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
    return model


# --------------------------------------------------------------------------------------------
# The skeleton every stage script shares: set up, (build models), train, test
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageContext:
    """What a stage script has once its flags are checked; the data is tokenized (and cached)
    on first use, after the stage has built its models, so that a bad model flag or checkpoint
    stops the run before any cache file is written."""

    args: argparse.Namespace
    dist: Distributed
    labels: List[str]
    domains: List[str]
    head_of: Dict[str, Optional[int]]
    tokenizer: object
    vocab_file: str
    run_dir: RunDir
    _features: Optional[Dict[str, Dict[str, Dict[str, torch.Tensor]]]] = None

    @property
    def features(self) -> Dict[str, Dict[str, Dict[str, torch.Tensor]]]:
        if self._features is None:
            self._features = load_features(self.args, self.domains, self.tokenizer, self.dist)
        return self._features


def begin_stage(args, vocab_file_of: Callable[[argparse.Namespace], str],
                multi_domain: bool) -> StageContext:
    """Check flags, start the process group, seed, read the vocabulary.

    Single-domain stages train --domain with one head; multi-domain stages train every domain
    of the task, one head each, with --domain as the fit domain. Nothing is written yet: the
    data is tokenized on first use of ``context.features`` (after the models are built)."""
    from data_processing import get_processor
    validate_common_args(args)
    resolve_checkpoint_flags(args)
    processor = get_processor(args.task)
    if args.domain not in processor.domains:
        raise ValueError(f"unknown {args.task} domain '{args.domain}' "
                         f"(expected one of {', '.join(processor.domains)})")
    dist = Distributed()
    setup_logging(main=dist.is_main)
    set_seed(args.seed)
    domains = list(processor.domains) if multi_domain else [args.domain]
    head_of = ({d: i for i, d in enumerate(domains)} if multi_domain else {args.domain: None})
    vocab_file = vocab_file_of(args)
    from data_processing import WordPieceTokenizer
    tokenizer = WordPieceTokenizer(vocab_file, lowercase=args.lowercase)
    return StageContext(args, dist, list(processor.labels), domains, head_of, tokenizer,
                        vocab_file, RunDir(args.output_dir, dist.is_main))


def train_stage(context: StageContext, model: nn.Module, compute_loss, stage_name: str,
                checkpoint_meta: Optional[dict] = None, **stage_options) -> TrainState:
    """Open the run directory (models are built by now, so bad checkpoints never leave one
    behind) and run the loop."""
    args, run = context.args, context.run_dir
    features = context.features  # bad data stops the run before its directory is made
    run.prepare_for_training(args, context.dist)
    setup_logging(run.file("train.log"), context.dist.is_main)
    copy_vocab(context.vocab_file, run)
    meta = {"task": args.task, "domains": context.domains, "labels": context.labels,
            "stage": stage_name, **(checkpoint_meta or {})}
    stage = Stage(model=model, domains=context.domains, fit_domain=args.domain,
                  train_features=split_of(features, "train"),
                  dev_features=split_of(features, "dev"), head_of=context.head_of,
                  compute_loss=compute_loss, checkpoint_meta=meta, **stage_options)
    return train(args, stage, run, context.dist)


def finish_stage(context: StageContext):
    """--do_test on rank 0 with each domain's best checkpoint, then leave the process group."""
    from modeling import model_from_checkpoint
    if context.args.do_test and context.dist.is_main:
        run_test(context.args, context.run_dir, context.domains, context.head_of,
                 split_of(context.features, "test"), split_of(context.features, "dev"),
                 context.dist.device, model_from_checkpoint)
    context.dist.close()


def stage_main(build_parser: Callable[[], argparse.ArgumentParser],
               run: Callable[[argparse.Namespace], None], argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return main_guard(lambda: run(args))
    finally:
        leave_process_group()
