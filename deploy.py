"""The deployed forms of a trained model: ONNX (fp32), dynamically quantized int8 ONNX, and
the runtime that serves them (ONNX Runtime), behind one predictor interface with PyTorch.

export.py calls ``write_onnx`` (and ``write_int8``) for each folder it exports; predict.py and
bench.py read models through ``load_backend``. The ONNX graph takes ``input_ids``,
``token_type_ids`` and ``attention_mask`` (int64, batch x sequence, both axes dynamic) and
returns ``logits`` (batch x labels) of one head; its metadata holds the label names, the run's
sequence length, the domain and the task. onnx and onnxruntime are an optional extra
(requirements-dev.txt installs them): without them only the ONNX paths fail, in one line.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

ONNX_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OPSET = 17
# Export check: the ONNX model's fp32 logits against PyTorch's on a few inputs.
CHECK_TOLERANCE = 1e-4


class MissingExtra(RuntimeError):
    """The deploy extra (onnx, onnxruntime) is not installed."""


def require(package: str):
    """Import ``package`` of the deploy extra, or fail in one line saying how to get it."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingExtra(f"{package.split('.')[0]} is not installed: the ONNX export and "
                           f"runtime need the deploy extra (pip install onnx onnxruntime, "
                           f"or make setup-dev)") from error


class HeadLogits(nn.Module):
    """One head's logits of a BertClassifier: what a deployed model computes."""

    def __init__(self, model: nn.Module, head: Optional[int]):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids, token_type_ids, attention_mask):
        return self.model(input_ids, token_type_ids, attention_mask, domain=self.head,
                          score_layers=(), fit=False).logits


def sample_inputs(vocab_size: int, batch: int, length: int, seed: int = 0):
    """Random ids with a padded tail in every other row (checks the mask path too)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab_size > 2000 else 5, vocab_size, (batch, length),
                        generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1::2, max(2, length // 2):] = 0
    ids[1::2, max(2, length // 2):] = 0
    segments = torch.zeros(batch, length, dtype=torch.long)
    return ids, segments, mask


def write_onnx(model: nn.Module, head: Optional[int], path: str, metadata: Dict[str, str],
               max_seq_length: int) -> float:
    """Export one head to ``path`` (written atomically), check it against PyTorch, return the
    largest logit difference seen. Raises when it exceeds CHECK_TOLERANCE."""
    onnx = require("onnx")
    require("onnxruntime")
    wrapper = HeadLogits(model, head).eval()
    example = sample_inputs(model.config.vocab_size, 2, min(16, max_seq_length))
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes["logits"] = {0: "batch"}
    partial = path + ".partial"
    with warnings.catch_warnings():
        # The TorchScript exporter: quick, and what onnxruntime's quantizer knows best; torch
        # warns that torch.export is the future default.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, partial, input_names=list(INPUT_NAMES),
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    wrapper.eval()  # the exporter restores the training flag it found; keep it off
    graph = onnx.load(partial)
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, partial)
    difference = check_against_torch(wrapper, partial, max_seq_length)
    if difference > CHECK_TOLERANCE:
        os.remove(partial)
        raise RuntimeError(f"{path}: the ONNX model's logits differ from PyTorch's by "
                           f"{difference:.2e} (more than {CHECK_TOLERANCE:g}); not written")
    os.replace(partial, path)
    return difference


def check_against_torch(wrapper: nn.Module, path: str, max_seq_length: int) -> float:
    """The largest |logit difference| between ``path`` on ONNX Runtime and ``wrapper`` over a
    few batch sizes and lengths (padded rows included)."""
    session = make_session(path)
    worst = 0.0
    for batch, length in ((1, 7), (3, min(33, max_seq_length)), (4, max_seq_length)):
        ids, segments, mask = sample_inputs(wrapper.model.config.vocab_size, batch, length,
                                            seed=batch)
        with torch.no_grad():
            expected = wrapper(ids, segments, mask).float().numpy()
        got = session.run(["logits"], {"input_ids": ids.numpy(), "token_type_ids":
                                       segments.numpy(), "attention_mask": mask.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def write_int8(onnx_path: str, path: str, num_heads: int, hidden_size: int, vocab_size: int):
    """Dynamically quantized int8 copy of ``onnx_path``: int8 weights per output channel
    (7-bit range, which keeps CPUs without VNNI from saturating their u8 x s8 products),
    activations quantized per batch at run time. The graph is first fused by ONNX Runtime's
    BERT optimizer (attention, skip + LayerNorm, GELU: about 20% off the int8 student's
    batch-1 latency here, BENCHMARKS.md) when the fused fp32 graph gives the plain one's
    logits to CHECK_TOLERANCE; else the plain graph is quantized."""
    import logging
    onnx = require("onnx")
    quantization = require("onnxruntime.quantization")
    partial = path + ".partial.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's and optimizer's advice and progress lines
    try:
        source = fused_graph(onnx_path, path + ".fused.onnx", num_heads, hidden_size,
                             vocab_size)
        quantization.quantize_dynamic(
            source or onnx_path, partial, weight_type=quantization.QuantType.QInt8,
            per_channel=True, reduce_range=True,
            # fused operators (Attention, SkipLayerNormalization) carry no shape information
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
        if os.path.exists(path + ".fused.onnx"):
            os.remove(path + ".fused.onnx")
    os.replace(partial, path)


def fused_graph(onnx_path: str, out_path: str, num_heads: int, hidden_size: int,
                vocab_size: int) -> Optional[str]:
    """``onnx_path`` with ONNX Runtime's BERT fusions, written to ``out_path``, or None when
    the optimizer is unavailable or its graph's logits differ from the plain graph's."""
    try:
        from onnxruntime.transformers import optimizer
    except ImportError:
        return None
    fused = optimizer.optimize_model(onnx_path, model_type="bert", num_heads=num_heads,
                                     hidden_size=hidden_size)
    fused.save_model_to_file(out_path)
    plain, candidate = make_session(onnx_path), make_session(out_path)
    for batch, length in ((1, 9), (3, 24)):
        ids, segments, mask = sample_inputs(vocab_size, batch, length, seed=batch)
        feed = {"input_ids": ids.numpy(), "token_type_ids": segments.numpy(),
                "attention_mask": mask.numpy()}
        try:
            difference = np.abs(plain.run(["logits"], feed)[0]
                                - candidate.run(["logits"], feed)[0]).max()
        except Exception:  # a fusion ONNX Runtime cannot run here: keep the plain graph
            return None
        if difference > CHECK_TOLERANCE:
            return None
    return out_path


def make_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session of ``path``; a file ONNX Runtime cannot read is named."""
    ort = require("onnxruntime")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no ONNX model")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types for bad files
        raise ValueError(f"{path}: not a readable ONNX model ({str(error).splitlines()[0]})") \
            from None


def onnx_metadata(path: str) -> Dict[str, str]:
    return dict(make_session(path).get_modelmeta().custom_metadata_map)


def length_batches(lengths: Sequence[int], batch_size: int) -> List[np.ndarray]:
    """Indices of the examples in batches of similar length (longest first), so that each
    batch is padded only to its own longest example."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def trim(features: Dict[str, np.ndarray], rows: np.ndarray) -> Dict[str, np.ndarray]:
    """``rows`` of the padded features, cut to the longest of them."""
    longest = int(features["attention_mask"][rows].sum(axis=1).max())
    return {name: np.ascontiguousarray(features[name][rows, :max(longest, 1)])
            for name in ("input_ids", "segment_ids", "attention_mask")}


class OnnxBackend:
    """Logits of padded features from an ONNX model on ONNX Runtime."""

    name = "onnx"

    def __init__(self, path: str, threads: Optional[int] = None):
        self.path = path
        self.session = make_session(path, threads)

    def logits(self, features: Dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["logits"], {
            "input_ids": features["input_ids"].astype(np.int64),
            "token_type_ids": features["segment_ids"].astype(np.int64),
            "attention_mask": features["attention_mask"].astype(np.int64)})[0]


class TorchBackend:
    """Logits of padded features from a BertClassifier head (fp32, or bf16 autocast)."""

    name = "torch"

    def __init__(self, model: nn.Module, head: Optional[int], device: str = "cpu",
                 amp: str = "off"):
        self.model, self.head = model.eval(), head
        self.device, self.amp = torch.device(device), amp

    @torch.no_grad()
    def logits(self, features: Dict[str, np.ndarray]) -> np.ndarray:
        from runtime import autocast
        tensors = {k: torch.from_numpy(np.asarray(v)).long().to(self.device)
                   for k, v in features.items() if k != "labels"}
        with autocast(self.device, self.amp):
            out = self.model(tensors["input_ids"], tensors["segment_ids"],
                             tensors["attention_mask"], domain=self.head, score_layers=(),
                             fit=False)
        return out.logits.float().cpu().numpy()


def predict_features(backend, features: Dict[str, np.ndarray], batch_size: int,
                     on_batch=None) -> np.ndarray:
    """Logits of every example, batched by length, returned in input order."""
    count = features["input_ids"].shape[0]
    lengths = features["attention_mask"].sum(axis=1)
    out = None
    for rows in length_batches(lengths, batch_size):
        logits = backend.logits(trim(features, rows))
        if out is None:
            out = np.zeros((count, logits.shape[1]), dtype=np.float32)
        out[rows] = logits
        if on_batch is not None:
            on_batch(len(rows))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def onnx_file_of(folder: str, int8: bool) -> str:
    return os.path.join(folder, INT8_FILE if int8 else ONNX_FILE)


def has_onnx(folder: str) -> bool:
    return os.path.isdir(folder) and (os.path.isfile(onnx_file_of(folder, False))
                                      or os.path.isfile(onnx_file_of(folder, True)))


def labels_of(metadata: Dict[str, str]) -> List[str]:
    return json.loads(metadata.get("labels", "[]"))


def export_metadata(labels: Sequence[str], max_seq_length: int, domain: Optional[str],
                    task: Optional[str], lowercase: bool) -> Dict[str, str]:
    return {"labels": json.dumps(list(labels)), "max_seq_length": str(max_seq_length),
            "domain": domain or "", "task": task or "", "do_lower_case": str(lowercase).lower()}


def int8_from(model: nn.Module, onnx_path: str, path: str):
    """``write_int8`` for ``model``'s exported graph (its heads and width)."""
    write_int8(onnx_path, path, model.config.num_attention_heads, model.config.hidden_size,
               model.config.vocab_size)


def file_size_mb(path: str) -> float:
    return os.path.getsize(path) / 2 ** 20


def describe(folder: str) -> Tuple[str, ...]:
    """The deployed files of an exported folder that exist."""
    return tuple(name for name in ("model.safetensors", ONNX_FILE, INT8_FILE)
                 if os.path.isfile(os.path.join(folder, name)))
