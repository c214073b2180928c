"""The one training / evaluation loop of all four stages, with checkpoints and resume.

* ``build_optimizer`` / ``linear_warmup_schedule``: AdamW with the spec's no-decay groups and
  linear warm-up then linear decay to 0.
* ``Stage`` + ``train``: the loop (AMP, gradient clipping, dev evaluation every ``val_freq``
  steps, best overall and best per-domain checkpoints, resumable state, non-finite guard). It
  knows nothing of the stages: each passes its model and its ``compute_loss``.
* ``evaluate`` / ``run_test``: accuracy per domain; test with each domain's best checkpoint.

Importing this module has no side effects.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from runtime import Distributed, autocast, make_scaler, to_device, unwrap
from utils import STOPS, RunDir, RunStopped, atomic_torch_save, logger, plural


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------
def _no_decay(name: str) -> bool:
    """Biases and LayerNorm weights are not decayed (BERT's recipe)."""
    return name.endswith("bias") or "layernorm" in name.lower()


def build_optimizer(modules: Dict[str, nn.Module], lr: float, weight_decay: float,
                    fused: bool = False):
    """AdamW (0.9, 0.999, 1e-8) over the named modules' trainable parameters. ``fused``: the
    one-kernel AdamW (faster; its fp32 rounding differs from the default in the last bit, so
    only the mixed-precision runs use it and the fp32 recipe's numbers stay as they were)."""
    decay, no_decay = [], []
    for prefix, module in modules.items():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                (no_decay if _no_decay(f"{prefix}.{name}") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if fused else {}))


def linear_warmup_schedule(optimizer, total_steps: int, warmup_proportion: float):
    """Linear warm-up over the first ``warmup_proportion`` of steps, then linear decay to 0."""
    warmup = int(total_steps * warmup_proportion)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
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
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Exactly what the loop reads: the step budget, the batch sizes, the optimiser and its
    schedule, clipping, AMP, the evaluation cadence (which is also the save cadence: each
    evaluation writes the resume state), resume, the seed of the sampler and the fault guard."""

    batch_size: int                   # per domain and process
    learning_rate: float
    num_train_epochs: float = 1.0
    max_steps: int = 0                # > 0: this many steps, whatever the epochs say
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    amp: str = "off"                  # off | bf16 | fp16 (auto is resolved before)
    val_freq: int = 50                # dev evaluation and resume state every N steps
    eval_batch_size: int = 64
    resume: bool = False
    seed: int = 42
    progress: bool = True
    max_nonfinite_steps: int = 10
    length_buckets: bool = False      # batches of similar length, padded to their longest

    @classmethod
    def from_args(cls, args) -> "LoopConfig":
        """The one place the stage flags become the loop's config."""
        # a flag the namespace lacks (one built by hand before the flag existed) takes the
        # field's default; the required fields must be there
        values = {f.name: (getattr(args, f.name) if f.default is dataclasses.MISSING
                           else getattr(args, f.name, f.default))
                  for f in dataclasses.fields(cls) if f.name != "progress"}
        return cls(progress=not args.no_progress, **values)


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
    """The TensorBoard event file of a run, written in this thread (event_file.py: the
    libraries' background writer thread dies on a full disk and then blocks the run)."""
    from event_file import EventFileWriter
    return EventFileWriter(path)


def _log_scalars(writer, prefix: str, values: Dict[str, float], step: int):
    if writer is None:
        return
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", float(value), step)


def train(config: LoopConfig, stage: Stage, run: RunDir, dist: Distributed):
    """Train ``stage`` as ``config`` says; writes checkpoints, logs and dev results into ``run``."""
    if not isinstance(config, LoopConfig):
        raise TypeError(f"train() takes a LoopConfig (LoopConfig.from_args(flags)), got "
                        f"{type(config).__name__}")
    from data_processing import MultiDomainBatchSampler, take, trim_to_longest
    from tqdm import tqdm

    device = dist.device
    sizes = [stage.train_features[d]["labels"].shape[0] for d in stage.domains]
    lengths = ([stage.train_features[d]["attention_mask"].sum(dim=1).numpy()
                for d in stage.domains] if config.length_buckets else None)
    sampler = MultiDomainBatchSampler(sizes, config.batch_size, stage.domains.index(stage.fit_domain),
                                      config.seed, dist.rank, dist.world_size, lengths)
    total_steps = (config.max_steps if config.max_steps > 0
                   else math.ceil(len(sampler) * config.num_train_epochs))
    model = dist.wrap(stage.model.to(device))
    stage.model = model
    modules = {"model": unwrap(model), **(stage.extra_modules if stage.optimise_extra else {})}
    optimizer = build_optimizer(modules, config.learning_rate, config.weight_decay,
                                fused=config.amp != "off")
    scheduler = linear_warmup_schedule(optimizer, total_steps, config.warmup_proportion)
    scaler = make_scaler(device, config.amp)
    state = TrainState()
    if config.resume:
        state = _restore(run, stage, optimizer, scheduler, scaler)
    writer = None
    if dist.is_main:
        writer = summary_writer(run.file("tensorboard"))
    logger.info("training %s on %s: %s (%d per epoch), batch %d x %s x %s",
                type(unwrap(model)).__name__, ",".join(stage.domains), plural(total_steps, "step"),
                len(sampler), config.batch_size, plural(len(stage.domains), "domain"),
                plural(dist.world_size, "process", "processes"))
    parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not dist.is_main
                    or not config.progress, desc="train", dynamic_ncols=True)
    model.train()
    for module in stage.extra_modules.values():
        module.train()
    resume_state = (run, stage, optimizer, scheduler, scaler)
    # SIGINT / SIGTERM inside the loop stop it at the next step boundary (_stop_if_asked).
    with STOPS.deferred():
        try:
            _stop_if_asked(state, total_steps, dist, resume_state)
            while state.global_step < total_steps:
                for indices in sampler.epoch(state.epoch, state.step_in_epoch):
                    # example_index: which training examples (the teacher cache's rows)
                    batches = [{**take(stage.train_features[d], idx),
                                "example_index": torch.as_tensor(idx)}
                               for d, idx in zip(stage.domains, indices)]
                    if config.length_buckets:
                        batches = trim_to_longest(batches)
                    batches = [to_device(batch, device) for batch in batches]
                    with autocast(device, config.amp):
                        losses = stage.compute_loss(model, batches)
                    _optimisation_step(config, losses["loss"], optimizer, scheduler, scaler,
                                       parameters, state, dist,
                                       stage.extra_modules if stage.optimise_extra else {})
                    state.global_step += 1
                    state.step_in_epoch += 1
                    _injected_fault(state.global_step, dist.rank, run.path)
                    progress.update(1)
                    if dist.is_main:
                        scalars = {k: float(v.detach()) for k, v in losses.items()}
                        scalars["lr"] = scheduler.get_last_lr()[0]
                        _log_scalars(writer, "train", scalars, state.global_step)
                        progress.set_postfix(loss=f"{scalars['loss']:.4f}")
                    finished = state.global_step >= total_steps
                    if state.global_step % config.val_freq == 0 or finished:
                        _evaluate_and_save(config, stage, run, dist, state, writer, optimizer,
                                           scheduler, scaler, total_steps)
                    if finished:
                        break
                    _stop_if_asked(state, total_steps, dist, resume_state)
                else:
                    state.epoch += 1
                    state.step_in_epoch = 0
        except BaseException as err:
            if writer is not None and not isinstance(err, RunStopped):
                writer.failed = True  # close without flushing: the first error is the one told
            raise
        finally:
            progress.close()
            if writer is not None:
                writer.close()
    check_replicas_agree(unwrap(model), dist)
    return state


def _injected_fault(step: int, rank: int, run_path: str = "."):
    """Fault injection for the reliability tests: HRKD_KILL_AT_STEP=N [HRKD_KILL_RANK=r]
    [HRKD_KILL_SIGNAL=KILL|TERM|INT] sends the signal (default SIGKILL) to the process right
    after optimisation step N (on rank r only, if given); HRKD_FILL_DISK_AT_STEP=N fills the
    run directory's file system there (a file ``.hrkd-filler`` beside the run directory,
    written until the disk says it is full); HRKD_HOLD_AT_STEP=N with HRKD_HOLD_RUN=<run
    directory> holds that run once after step N (it writes ``.held`` there) until a signal
    arrives: a node lost mid-run."""
    if os.environ.get("HRKD_FILL_DISK_AT_STEP") == str(step):
        filler = os.path.join(os.path.dirname(os.path.abspath(run_path)), ".hrkd-filler")
        with open(filler, "ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError:
                pass
            try:
                while True:
                    handle.write(b"\0")
            except OSError:
                pass
    if os.environ.get("HRKD_HOLD_AT_STEP") == str(step) and os.path.abspath(run_path) == \
            os.path.abspath(os.environ.get("HRKD_HOLD_RUN", "")) and \
            not os.path.exists(os.path.join(run_path, ".held")):
        _hold(run_path)
    target = os.environ.get("HRKD_KILL_AT_STEP")
    if not target or int(target) != step:
        return
    if os.environ.get("HRKD_KILL_RANK", str(rank)) == str(rank):
        import signal
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("HRKD_KILL_SIGNAL", "KILL")))


def _hold(run_path: str):
    """Write ``<run>/.held`` and wait for SIGINT / SIGTERM (then the step boundary stops)."""
    import time
    with open(os.path.join(run_path, ".held"), "w") as handle:
        handle.write(str(os.getpid()))
    while not STOPS.signum:
        time.sleep(0.05)


def _stop_if_asked(state: TrainState, total_steps: int, dist: Distributed, resume_state):
    """At a step boundary: if SIGINT / SIGTERM arrived (on any rank), save the resume state,
    say how to continue (train.log and stderr) and raise ``RunStopped``."""
    signum = STOPS.signum or 0
    if dist.enabled:  # every rank stops at the same step, or DDP would wait for the others
        flag = torch.tensor([signum], dtype=torch.long, device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    if not signum:
        return
    run, stage, optimizer, scheduler, scaler = resume_state
    import signal
    if dist.is_main:
        _save_resume_state(run, stage, state, optimizer, scheduler, scaler)
        run.update_results(stopped={"step": state.global_step, "total_steps": total_steps,
                                    "signal": signal.Signals(signum).name})
    message = (f"stopped at step {state.global_step} of {total_steps} by "
               f"{signal.Signals(signum).name}; continue with --resume")
    logger.warning(message)
    dist.barrier()
    raise RunStopped(signum, message, logged=True)


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


def _optimisation_step(config: LoopConfig, loss, optimizer, scheduler, scaler, parameters, state: TrainState,
                       dist: Distributed, extra_modules: Dict[str, nn.Module]):
    """Backward, unscale, clip, step; a non-finite loss skips the update."""
    if not torch.isfinite(loss.detach()):
        state.nonfinite_run += 1
        logger.warning("step %d: non-finite loss (%s), update skipped", state.global_step + 1,
                       float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        if state.nonfinite_run >= config.max_nonfinite_steps:
            raise RuntimeError(f"{state.nonfinite_run} consecutive non-finite losses at step "
                               f"{state.global_step + 1}; stopping (the last good checkpoint "
                               f"is kept)")
        _advance_schedule(scheduler)
        return
    state.nonfinite_run = 0
    scaler.scale(loss).backward()
    _average_extra_gradients(dist, extra_modules)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    _advance_schedule(scheduler)
    optimizer.zero_grad(set_to_none=True)


def _advance_schedule(scheduler):
    """One step of the learning-rate schedule, also after a skipped update (a non-finite loss,
    an fp16 overflow): the rate follows the step counter, so a resumed run lands on the same
    rate. torch warns about a schedule step without an optimizer step; here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                category=UserWarning)
        scheduler.step()


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


def _evaluate_and_save(config: LoopConfig, stage: Stage, run: RunDir, dist: Distributed, state: TrainState,
                       writer, optimizer, scheduler, scaler, total_steps: int):
    """Dev accuracy per domain; keep the best overall and per-domain checkpoints; resume state."""
    if dist.is_main:
        dev = evaluate(unwrap(stage.model), stage.dev_features, stage.head_of,
                       config.eval_batch_size, dist.device, config.amp)
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
        if writer is not None:
            writer.flush()  # on disk at every evaluation (a full disk stops the run here)
        run.update_results(dev={"best_mean": state.best_mean, "best_step": state.best_step,
                                "best_per_domain": state.best_per_domain,
                                "best_step_per_domain": state.best_step_per_domain,
                                "last": dev, "last_step": state.global_step,
                                "total_steps": total_steps, **extra})
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
    # after the file: status and the resume line name the step a resume really starts from
    run.update_results(resume_step=state.global_step)


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
def run_test(config: LoopConfig, run: RunDir, domains: List[str], head_of: Dict[str, Optional[int]],
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
        test.update(evaluate(model, one, head_of, config.eval_batch_size, device, config.amp))
        dev.update(evaluate(model, {domain: dev_features[domain]}, head_of,
                            config.eval_batch_size, device, config.amp))
    if len(domains) > 1:
        model = load_model(run.best_model()).to(device)
        overall_test = evaluate(model, test_features, head_of, config.eval_batch_size, device,
                                config.amp)
    summary = {"per_domain": test, "mean": float(np.mean(list(test.values()))),
               "dev_per_domain": dev,
               # the test sets' sizes: report.py's binomial error of each accuracy
               "examples_per_domain": {d: int(test_features[d]["labels"].shape[0])
                                       for d in domains}}
    if overall_test:
        summary["best_overall_checkpoint"] = overall_test
    run.update_results(test=summary)
    logger.info("test %s mean %.4f", " ".join(f"{d}={v:.4f}" for d, v in test.items()),
                summary["mean"])
    return summary
