"""The runtime every stage runs in: seeds, the torchrun / DDP process group, AMP.

* ``Distributed``: LOCAL_RANK / RANK / WORLD_SIZE from torchrun; NCCL on GPU, gloo on CPU;
  rank 0 writes. ``leave_process_group`` destroys the group on every exit path.
* ``autocast`` / ``make_scaler``: torch.amp with ``--amp off|bf16|fp16`` (``AMP_DTYPES``);
  ``resolve_amp`` turns ``--amp auto`` into bf16 where the hardware computes it natively
  (CPU: AVX512-BF16 or AMX; GPU: bf16 support), fp32 elsewhere.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import random
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

# --amp values and the dtype each computes in (one map for autocast, scalers and teachers).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def describe_machine(device: torch.device) -> str:
    """The hardware a run's figures come from, for config.json and report.py: the GPU's name,
    or the CPU's model, core count and native bf16 feature, with the torch version."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (GPU)"
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                names = [line.split(":", 1)[1].strip() for line in handle
                         if line.startswith("model name")]
            model = names[0] if names else model
        except OSError:
            pass
        where = f"{model}, {os.cpu_count()} cores, {native_bf16(device) or 'no native bf16'}"
    return f"{where}; torch {torch.__version__}"


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------
def native_bf16(device: torch.device) -> str:
    """The hardware feature that computes bf16 natively on ``device``, or '' when there is none
    (bf16 there is emulated: on an AVX2-only CPU a bf16 matmul ran ~200x slower than fp32)."""
    if device.type == "cuda":
        return "CUDA bf16" if torch.cuda.is_bf16_supported() else ""
    if device.type != "cpu":
        return ""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return ""


def resolve_amp(amp: str, device: torch.device) -> Tuple[str, str]:
    """(--amp to run with, why): ``auto`` is bf16 where ``native_bf16`` finds support, else
    off (fp32); an explicit bf16 without native support runs, with a warning as the reason."""
    feature = native_bf16(device)
    if amp == "auto":
        if feature:
            return "bf16", f"--amp auto: bf16 ({device.type} computes it natively: {feature})"
        return "off", (f"--amp auto: fp32 (this {device.type} has no native bf16 "
                       f"(AVX512-BF16, AMX); bf16 would be emulated and slower)")
    if amp == "bf16" and not feature:
        return amp, (f"--amp bf16 on a {device.type} without native bf16: it is emulated "
                     f"here, far slower than fp32 (--amp auto picks fp32)")
    return amp, ""


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 only (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


# --------------------------------------------------------------------------------------------
# Moving batches
# --------------------------------------------------------------------------------------------
def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """On GPU: pinned host memory and asynchronous copies, so the copy overlaps compute."""
    if device.type != "cuda":
        return {name: tensor.to(device) for name, tensor in batch.items()}
    return {name: tensor.pin_memory().to(device, non_blocking=True)
            for name, tensor in batch.items()}
