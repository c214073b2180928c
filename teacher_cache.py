"""Teacher targets computed once: what the losses read from a frozen teacher, kept on disk.

A frozen teacher in eval mode gives the same outputs for an example every time, yet stages 2
and 4 recompute them in every epoch, every stage-4 variant and every student seed. Here they
are computed once per (teacher, domain) and reused:

* what is kept: the logits of the domain's head, the mapped layers' hidden states (embedding
  output included) and their attention scores -- exactly the tensors ``layer_losses`` and
  ``soft_cross_entropy`` read (``distillation.frozen_teacher_outputs``);
* the key: the teacher's weights (SHA-1 of names and bytes), the head, the training inputs
  themselves (SHA-1 of input ids, segments and masks: data, split, ratio, sequence length and
  tokenizer in one), the layer map, the dtype the teacher computes in (``--amp``) and the batch
  shape the targets were computed with;
* on disk beside the feature cache (``<cache_dir>/teacher/<key>/``): one ``.npy`` file per
  tensor, read back memory-mapped (a step reads only its rows), and ``manifest.json`` with
  shapes, dtypes and each file's SHA-1, written last; the folder is built under a temporary
  name and renamed, so a stopped build leaves nothing; a file whose size or SHA-1 does not
  match is named in a log line, the entry deleted and rebuilt;
* a size budget (``--teacher_cache_gb``): beyond it, or beyond the free disk space, the cache
  is off for the run, with one log line saying how much it would take.

Exact: the targets are computed in chunks of the very row count the training step feeds the
teacher (the last chunk padded by wrapping around), so every row goes through the same kernels
as in the uncached step; with the cache a run gives the same results and weights (fp32,
tested).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from distillation import frozen_teacher_outputs, teacher_layer_for
from modeling import ModelOutput
from runtime import autocast
from utils import disk_full_guard, remove_dead_builds

logger = logging.getLogger("hrkd")

CACHE_VERSION = 1
MANIFEST = "manifest.json"
# numpy has no bfloat16: such tensors are stored as their raw 16 bits.
_RAW_DTYPES = {torch.bfloat16: np.uint16}


def _digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha1(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def target_bytes(examples: int, seq_len: int, teacher_width: int, teacher_heads: int,
                 student_layers: int, labels: int, bytes_per_value: int = 4) -> int:
    """Bytes of one domain's targets: L_s + 1 hidden states (T x H_t), L_s score maps
    (heads x T x T) and the logits, per example."""
    per_example = ((student_layers + 1) * seq_len * teacher_width
                   + student_layers * teacher_heads * seq_len * seq_len + labels)
    return examples * per_example * bytes_per_value


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


class DomainTargets:
    """One domain's teacher targets, memory-mapped; ``output(indices)`` is the ModelOutput the
    live teacher would give for those training examples (None where the losses read nothing)."""

    def __init__(self, folder: str, manifest: dict):
        self.folder = folder
        self.teacher_layers = manifest["teacher_layers"]
        self.mapped = manifest["mapped"]
        self.arrays = {name: np.load(os.path.join(folder, entry["file"]), mmap_mode="r")
                       for name, entry in manifest["tensors"].items()}
        self.dtypes = {name: getattr(torch, entry["dtype"])
                       for name, entry in manifest["tensors"].items()}

    def _rows(self, name: str, indices: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self.arrays[name][indices]))
        dtype = self.dtypes[name]
        return rows.view(dtype) if dtype in _RAW_DTYPES else rows

    def output(self, indices: torch.Tensor, device: torch.device,
               length: Optional[int] = None) -> ModelOutput:
        """``length``: a batch cut to its longest input (--length_buckets) reads the first
        ``length`` positions of each stored row (padded keys are masked out of every kept
        position's attention, so those are the values a teacher run at that length gives, to
        the rounding of its matrix products)."""
        index = indices.cpu().numpy()
        hidden = [None] * (self.teacher_layers + 1)
        scores = [None] * self.teacher_layers
        cut = slice(None) if length is None else slice(0, length)
        for level in [0, *self.mapped]:
            hidden[level] = self._rows(f"hidden_{level}", index)[:, cut].to(device,
                                                                           non_blocking=True)
        for layer in self.mapped:
            scores[layer - 1] = self._rows(f"scores_{layer}", index)[:, :, cut, cut].to(
                device, non_blocking=True)
        return ModelOutput(self._rows("logits", index).to(device), hidden, scores)


def keep_out_of_compiled_regions():
    """Under --compile the numpy reads of ``DomainTargets.output`` run eagerly, outside the
    compiled loss. Done on demand: ``torch.compiler.disable`` imports dynamo, two seconds of
    every process start otherwise."""
    if not getattr(DomainTargets.output, "_kept_eager", False):
        DomainTargets.output = torch.compiler.disable(DomainTargets.output)
        DomainTargets.output._kept_eager = True


class TeacherTargets:
    """The targets of every domain a loss distils, looked up by each batch's example indices
    (``example_index``, put there by the training loop). Empty until ``fill`` (the cache is
    built once the run directory is open); empty, the losses run the live teachers."""

    def __init__(self, per_domain: Optional[List[DomainTargets]] = None):
        self.per_domain = per_domain

    def fill(self, per_domain: Optional[List[DomainTargets]]):
        self.per_domain = per_domain

    def outputs(self, batches: Sequence[Dict[str, torch.Tensor]]) -> Optional[List[ModelOutput]]:
        """One ModelOutput per domain batch, or None when the cache is empty or a batch carries
        no example indices (e.g. the meta step's held-out batches): the caller then runs the
        live teacher."""
        if self.per_domain is None or any("example_index" not in b for b in batches):
            return None
        return [targets.output(batch["example_index"], batch["input_ids"].device,
                               batch["input_ids"].shape[1])
                for targets, batch in zip(self.per_domain, batches)]


def _describe(teacher_digest: str, head: Optional[int], inputs: Dict[str, torch.Tensor], mapped,
              amp: str, chunk_rows: int) -> dict:
    return {"version": CACHE_VERSION, "teacher": teacher_digest, "head": head,
            "inputs": _digest(inputs["input_ids"], inputs["segment_ids"],
                              inputs["attention_mask"]),
            "mapped": list(mapped), "amp": amp, "chunk_rows": chunk_rows}


def _read_manifest(folder: str, verify: bool = True) -> Optional[dict]:
    """The manifest when every file is there with its size and SHA-1, else None (logged)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        for name, entry in manifest["tensors"].items():
            file = os.path.join(folder, entry["file"])
            if os.path.getsize(file) != entry["bytes"]:
                raise ValueError(f"{file}: {os.path.getsize(file)} bytes, expected "
                                 f"{entry['bytes']}")
            if verify and file_sha1(file) != entry["sha1"]:
                raise ValueError(f"{file}: contents do not match its SHA-1")
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("teacher cache %s unreadable (%s); deleted, rebuilding", folder,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _compute(folder: str, teacher, head: Optional[int], inputs: Dict[str, torch.Tensor],
             student_layers: int, amp: str, chunk_rows: int, device, description: dict):
    """Run the teacher over every example in chunks of ``chunk_rows`` and write the tensors
    into ``folder`` (a temporary name; the caller renames it)."""
    count = inputs["input_ids"].shape[0]
    order = np.arange(math.ceil(count / chunk_rows) * chunk_rows) % count  # wrap the last chunk
    arrays, tensors = {}, {}
    for start in range(0, count, chunk_rows):
        rows = order[start:start + chunk_rows]
        batch = {k: inputs[k][torch.from_numpy(rows)].long().to(device)
                 for k in ("input_ids", "segment_ids", "attention_mask")}
        # A multi-domain teacher picks each row's head as in the training step (per-row ids).
        heads = None if head is None else torch.full((len(rows),), head, dtype=torch.long,
                                                     device=device)
        with autocast(device, amp):
            out = frozen_teacher_outputs(teacher, batch["input_ids"], batch["segment_ids"],
                                         batch["attention_mask"], heads, student_layers)
        keep = min(chunk_rows, count - start)
        parts = {"logits": out.logits}
        for level, hidden in enumerate(out.hidden_states):
            if hidden is not None:
                parts[f"hidden_{level}"] = hidden
        for layer, scores in enumerate(out.attention_scores, start=1):
            if scores is not None:
                parts[f"scores_{layer}"] = scores
        for name, tensor in parts.items():
            tensor = tensor[:keep].detach().cpu().contiguous()
            if name not in arrays:
                raw = _RAW_DTYPES.get(tensor.dtype)
                np_dtype = raw or tensor.numpy().dtype
                arrays[name] = np.lib.format.open_memmap(
                    os.path.join(folder, f"{name}.npy"), mode="w+", dtype=np_dtype,
                    shape=(count, *tensor.shape[1:]))
                tensors[name] = str(tensor.dtype).replace("torch.", "")
            values = tensor.view(torch.int16).numpy().view(np.uint16) \
                if tensor.dtype in _RAW_DTYPES else tensor.numpy()
            arrays[name][start:start + keep] = values
    manifest = {**description, "teacher_layers": teacher.config.num_hidden_layers,
                "examples": count, "tensors": {}}
    for name, array in arrays.items():
        array.flush()
        file = os.path.join(folder, f"{name}.npy")
        del array
        manifest["tensors"][name] = {"file": f"{name}.npy", "dtype": tensors[name],
                                     "bytes": os.path.getsize(file), "sha1": file_sha1(file)}
    arrays.clear()
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
    return manifest


def domain_targets(cache_dir: str, teacher, head: Optional[int], inputs: Dict[str, torch.Tensor],
                   student_layers: int, amp: str, chunk_rows: int, device,
                   teacher_digest: Optional[str] = None) -> DomainTargets:
    """One domain's targets: read from the cache when a valid entry exists, else computed and
    stored (atomically: a temporary folder renamed into place). ``teacher_digest``: the
    teacher's weights_digest when the caller has it (one hash per teacher, not per domain)."""
    from training import weights_digest
    mapped = teacher_layer_for(student_layers, teacher.config.num_hidden_layers)
    description = _describe(teacher_digest or weights_digest(teacher), head, inputs, mapped, amp,
                            chunk_rows)
    key = hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    folder = os.path.join(cache_dir, "teacher", key)
    manifest = _read_manifest(folder) if os.path.isdir(folder) else None
    if manifest is not None:
        logger.info("teacher targets read from %s (%d examples)", folder, manifest["examples"])
        return DomainTargets(folder, manifest)
    remove_dead_builds(os.path.dirname(folder))  # entries a killed process left half-built
    temporary = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        with disk_full_guard(temporary):
            manifest = _compute(temporary, teacher, head, inputs, student_layers, amp,
                                chunk_rows, device, description)
        try:
            os.rename(temporary, folder)
        except OSError:  # another process stored the same entry meanwhile: use theirs
            if _read_manifest(folder) is None:
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("teacher targets of %d examples computed once and stored in %s",
                manifest["examples"], folder)
    return DomainTargets(folder, manifest)


def free_bytes(path: str) -> int:
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    return shutil.disk_usage(existing).free


def prepare(mode: str, cache_dir: str, budget_gb: float, teachers, groups: List[List[int]],
            train_features: List[Dict[str, torch.Tensor]], student_layers: int, labels: int,
            batch_size: int, amp: str, device, dist=None) -> Optional[List[DomainTargets]]:
    """The targets of every domain (``groups[g]`` lists the domains teacher g serves; stage 2:
    one teacher, one domain), or None when the cache is off (``mode`` off, over the budget or
    the free disk space: one log line saying why and how much it would take). Rank 0 builds
    the entries; the other ranks wait and read them."""
    if mode == "off":
        return None
    config = teachers[0].config
    value_bytes = 2 if amp in ("bf16", "fp16") else 4
    needed = sum(target_bytes(f["input_ids"].shape[0], f["input_ids"].shape[1],
                              config.hidden_size, config.num_attention_heads, student_layers,
                              labels, value_bytes) for f in train_features)
    budget = budget_gb * 1e9
    if needed > budget:
        logger.info("teacher cache off: the targets would take %s, over --teacher_cache_gb %g "
                    "(the teacher runs in every step instead)", gigabytes(needed), budget_gb)
        return None
    free = free_bytes(cache_dir)
    if needed > 0.9 * free:
        logger.info("teacher cache off: the targets would take %s and %s has %s free",
                    gigabytes(needed), cache_dir, gigabytes(free))
        return None
    per_domain: List[Optional[DomainTargets]] = [None] * len(train_features)
    is_main = dist is None or dist.is_main
    if not is_main:
        dist.barrier()  # rank 0 builds; the others then find every entry
    from training import weights_digest
    for teacher, domains in zip(teachers, groups):
        digest = weights_digest(teacher)
        for domain in domains:
            head = domain if teacher.num_domains is not None else None
            per_domain[domain] = domain_targets(
                cache_dir, teacher, head, train_features[domain], student_layers, amp,
                batch_size * len(domains), device, digest)
    if dist is not None and is_main:
        dist.barrier()
    logger.info("teacher cache on: %s for %d domain(s) under %s", gigabytes(needed),
                len(train_features), os.path.join(cache_dir, "teacher"))
    return per_domain
