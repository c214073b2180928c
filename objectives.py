"""What each stage optimises: its models, its teachers, its loss.

Library code, imported by the stage scripts, the tools (bench.py) and the tests alike; the
training loop (training.py) knows nothing of it and only calls a stage's ``compute_loss``.

* models: ``build_teacher`` / ``build_student`` (checked against each other before anything
  is read or written), ``freeze`` for teachers;
* teachers of stage 4: ``teacher_checkpoints`` (best_model_<domain>.bin), ``load_teachers``
  (domains whose best checkpoint is the same share one teacher and one forward),
  ``teacher_outputs`` / ``student_outputs``;
* the four stages' losses: ``cross_entropy_loss`` (1), ``make_kd_loss`` (2),
  ``make_multi_domain_ce`` (3), ``make_hrkd_loss`` (4), with a typed config (``DistillConfig``)
  instead of the flag namespace; stages 2 and 4 read the teachers' targets from the teacher
  cache (teacher_cache.py) when it is filled.

Stage 4's domain weighting (the released graph and the strategies that replace it) is in
weighting.py, which builds on this module.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from data_processing import concat_domain_batches
from distillation import (frozen_teacher_outputs, hrkd_loss, teacher_layer_for,
                          tinybert_kd_loss)
from modeling import (BertClassifier, check_sequence_length, config_source, is_exported_folder,
                      load_weights, model_from_checkpoint, resolve_config, split_output)
from runtime import AMP_DTYPES, unwrap
from training import weights_digest
from utils import best_model_name, logger


# --------------------------------------------------------------------------------------------
# What stage 4's loss asks of a domain weighting and of a weight recorder. The strategies
# (weighting.py) build on this module, so the loss names only these shapes, never them.
# --------------------------------------------------------------------------------------------
class StepWeighting(Protocol):
    """A strategy giving w[l, d] for a step (weighting.DomainWeighting and its registry)."""

    def before_step(self, student, batches, teacher_outs) -> Dict[str, torch.Tensor]:
        """Work before the student's forward (e.g. a meta step); extra terms to log."""

    def weights(self, student_outs) -> Tuple[torch.Tensor, list]:
        """w[l, d] (levels, domains) and the hierarchical weights of each level."""


class WeightSink(Protocol):
    """Where the step's weights go between evaluations (weighting.WeightRecorder)."""

    def add(self, weights: torch.Tensor, hierarchy) -> None:
        """Take one step's weights."""


# --------------------------------------------------------------------------------------------
# Typed configs: what the losses and learners read
# --------------------------------------------------------------------------------------------
def config_from_args(cls, args, names: Dict[str, str]):
    """A config from the flags: ``names`` maps each field to its flag (dest) name."""
    return cls(**{field: getattr(args, flag) for field, flag in names.items()})


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Weights of the distillation terms (REFERENCE.md section 4)."""

    hidden_ratio: float = 1.0
    pred_ratio: float = 1.0
    temperature: float = 1.0

    @classmethod
    def from_args(cls, args) -> "DistillConfig":
        return config_from_args(cls, args, {"hidden_ratio": "hidden_ratio", "pred_ratio": "pred_ratio",
                                      "temperature": "temperature"})


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def freeze(model: nn.Module, amp: str = "off") -> nn.Module:
    """A teacher: eval mode (no dropout), no gradients.

    Under ``--amp bf16|fp16`` its linear layers are stored in that precision once: autocast
    casts them to it on every call anyway (it caches casts only of weights that need gradients),
    so the results are bit for bit the same and each step saves a cast of every teacher weight.
    Everything else (embeddings, LayerNorms) stays fp32, as autocast would use it."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if amp in AMP_DTYPES:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.to(AMP_DTYPES[amp])
    return model


def build_teacher(config_flag: Optional[str], init: Optional[str], vocab_size: int,
                  num_labels: int, max_seq_length: int, num_domains=None,
                  blocks: Optional[Sequence[int]] = None) -> BertClassifier:
    """A model trained on the gold labels (stages 1, 3): ``config_flag``, else ``init``'s
    config.json (with ``len(blocks)`` layers when ``blocks`` picks the initial blocks, as for a
    student: the no-distillation baseline), else bert_base; initialised from ``init`` when
    given."""
    config = resolve_config(config_source(config_flag, init, "bert_base"), vocab_size)
    if blocks and not config_flag:
        config.num_hidden_layers = len(blocks)
    if blocks and len(blocks) != config.num_hidden_layers:
        raise ValueError(f"--init_layers names {len(blocks)} blocks but the model config has "
                         f"{config.num_hidden_layers} layers")
    check_sequence_length(config, max_seq_length, "model")
    model = BertClassifier(config, num_labels, num_domains=num_domains)
    if init:
        load_weights(model, init, blocks=blocks)
    else:
        warn_random_init(config, "--init_checkpoint", "bert-base-uncased")
    return model


# Width from which a randomly initialised model is a mistake rather than a test (the demo's
# tiny models are 64 wide at most; BERT-base 768, TinyBERT 312).
RANDOM_INIT_WARNING_WIDTH = 256


def warn_random_init(config, flag: str, expected: str):
    if config.hidden_size >= RANDOM_INIT_WARNING_WIDTH:
        logger.warning("no %s: this %d-layer, %d-wide model starts from random weights and "
                       "will learn little on these data sets; the paper starts from %s (or "
                       "give all-MiniLM-L6-v2: PRESET=real)", flag, config.num_hidden_layers,
                       config.hidden_size, expected)


def check_heads(student_config, teacher_config):
    """Attention distillation compares the scores head by head: the counts must match."""
    if student_config.num_attention_heads != teacher_config.num_attention_heads:
        raise ValueError(
            f"the student has {student_config.num_attention_heads} attention heads and the "
            f"teacher {teacher_config.num_attention_heads}: attention distillation compares "
            f"them head by head; give the student {teacher_config.num_attention_heads} heads "
            f"(a --student_config whose num_attention_heads is "
            f"{teacher_config.num_attention_heads} and whose width it divides)")


def check_teacher_labels(teacher, labels: Sequence[str], path: str):
    """The teacher's head must score the task's labels (an exported folder of another task,
    say, would not)."""
    if teacher.num_labels != len(labels):
        raise ValueError(f"{path}: the teacher scores {teacher.num_labels} labels, this task "
                         f"has {len(labels)} ({', '.join(labels)}): distil a teacher of this "
                         f"task")


def check_layer_ratio(student_layers: int, teacher_layers: int, blocks=None):
    """The uniform layer map needs L_s to divide L_t; say which student sizes would work."""
    if blocks and len(blocks) != student_layers:
        raise ValueError(f"--student_init_layers names {len(blocks)} blocks but the student "
                         f"config has {student_layers} layers")
    if teacher_layers % student_layers:
        fits = [n for n in range(1, teacher_layers + 1) if teacher_layers % n == 0]
        raise ValueError(f"a {student_layers}-layer student does not fit the {teacher_layers}-"
                         f"layer teacher (student block i learns from teacher block "
                         f"i x L_t / L_s): give it {' or '.join(map(str, fits))} layers, e.g. "
                         f"--student_init_layers with that many blocks or a --student_config "
                         f"of that depth")
    teacher_layer_for(student_layers, teacher_layers)


def build_student(config_flag: Optional[str], init: Optional[str], blocks: Optional[Sequence[int]],
                  vocab_size: int, num_labels: int, teacher_config, max_seq_length: int,
                  num_domains=None) -> BertClassifier:
    """The student (stages 2, 4), checked against the teacher before anything is read or
    written: ``config_flag``, else ``init``'s config.json (with ``len(blocks)`` layers when
    ``blocks`` picks the initial blocks), else tinybert_4l_312."""
    config = resolve_config(config_source(config_flag, init, "tinybert_4l_312"), vocab_size)
    if blocks and not config_flag:
        config.num_hidden_layers = len(blocks)
    check_layer_ratio(config.num_hidden_layers, teacher_config.num_hidden_layers, blocks)
    check_heads(config, teacher_config)
    check_sequence_length(teacher_config, max_seq_length, "teacher")
    check_sequence_length(config, max_seq_length, "student")
    student = BertClassifier(config, num_labels, num_domains=num_domains,
                             fit_size=teacher_config.hidden_size)
    if init:
        load_weights(student, init, blocks=blocks)
    else:
        warn_random_init(config, "--student_init", "the general TinyBERT 4L-312")
    return student


# --------------------------------------------------------------------------------------------
# Teachers and outputs of the multi-domain stages
# --------------------------------------------------------------------------------------------
def teacher_checkpoints(teacher_dir: str, domains: List[str]) -> List[str]:
    """best_model_<domain>.bin of every domain; one error naming every missing domain."""
    if not os.path.isdir(teacher_dir):
        raise FileNotFoundError(f"{teacher_dir}: teacher run directory not found")
    if is_exported_folder(teacher_dir):
        raise ValueError(f"{teacher_dir}: an exported one-domain model; stage 4 distils a "
                         f"multi-domain teacher: give its stage-3 run directory "
                         f"(train_multi_domain.py)")
    paths = [os.path.join(teacher_dir, best_model_name(domain)) for domain in domains]
    missing = [d for d, p in zip(domains, paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{teacher_dir}: no stage-3 checkpoint for domain(s) "
                                f"{', '.join(missing)} (expected {best_model_name('<domain>')})")
    return paths


def load_teachers(paths: List[str], device, amp: str = "off") -> Tuple[list, List[List[int]]]:
    """Frozen teachers, one per distinct checkpoint, and the domains each one serves.

    Stage 3 often has the same evaluation step best for several domains; those domains then
    share one teacher (in memory and in one forward pass over their concatenated batches).
    """
    teachers, groups, index_of = [], [], {}
    for domain, path in enumerate(paths):
        model = model_from_checkpoint(path)
        key = weights_digest(model)
        if key not in index_of:
            index_of[key] = len(teachers)
            teachers.append(freeze(model, amp).to(device))
            groups.append([])
        groups[index_of[key]].append(domain)
    return teachers, groups


def teacher_outputs(teachers, groups, batches, student_layers: int):
    """Each domain's teacher output; one forward per distinct teacher, with per-row heads."""
    outputs = [None] * len(batches)
    for teacher, domains in zip(teachers, groups):
        merged, heads, sizes = concat_domain_batches([batches[d] for d in domains], domains)
        out = frozen_teacher_outputs(teacher, merged["input_ids"], merged["segment_ids"],
                                     merged["attention_mask"], heads, student_layers)
        for domain, part in zip(domains, split_output(out, sizes)):
            outputs[domain] = part
    return outputs


def student_outputs(student, batches, params=None):
    """One student forward over all domains, split per domain. With ``params`` the student runs
    functionally on those tensors (the meta step's virtual parameters)."""
    merged, domain_ids, sizes = concat_domain_batches(batches)
    inputs = (merged["input_ids"], merged["segment_ids"], merged["attention_mask"])
    if params is None:
        out = student(*inputs, domain=domain_ids)
    else:
        out = torch.func.functional_call(unwrap(student), params, inputs,
                                         {"domain": domain_ids})
    return split_output(out, sizes)


# --------------------------------------------------------------------------------------------
# The four stages' losses (each returns the loop's compute_loss(model, batches) -> dict)
# --------------------------------------------------------------------------------------------
def cross_entropy_loss(model, batches):
    """Stage 1: cross-entropy with the gold labels of the one domain."""
    batch = batches[0]
    logits = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                   score_layers=()).logits
    return {"loss": F.cross_entropy(logits.float(), batch["labels"])}


def batch_inputs(batch):
    """The model inputs of a batch: ids, segments, mask."""
    return batch["input_ids"], batch["segment_ids"], batch["attention_mask"]


def one_teacher_output(teacher, student, batches, targets=None):
    """What a one-domain distillation stage reads from its frozen teacher for ``batches[0]``:
    the teacher cache's targets when it is filled (``targets``), else a frozen forward."""
    cached = targets.outputs(batches) if targets is not None else None
    if cached:
        return cached[0]
    return frozen_teacher_outputs(teacher, *batch_inputs(batches[0]), None,
                                  unwrap(student).config.num_hidden_layers)


def make_kd_loss(teacher, distill: DistillConfig, targets=None):
    """Stage 2 (TinyBERT-KD): hidden-state, attention and prediction distillation. With
    ``targets`` (teacher_cache.TeacherTargets, once filled) the teacher's outputs are read
    from the cache instead of recomputed."""

    def compute_loss(student, batches):
        teacher_out = one_teacher_output(teacher, student, batches, targets)
        student_out = student(*batch_inputs(batches[0]))
        return tinybert_kd_loss(student_out, teacher_out, distill.hidden_ratio,
                                distill.pred_ratio, distill.temperature)

    return compute_loss


def make_multi_domain_ce(graph=None):
    """Stage 3: sum over domains of cross-entropy, each with its own head; one forward for all
    domains. With ``graph`` (off in the paper) each domain's term is weighted by one graph
    level over the per-domain mean of every reported hidden state."""

    def compute_loss(model, batches):
        batch, domain_ids, sizes = concat_domain_batches(batches)
        out = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                    domain=domain_ids, score_layers=())
        per_example = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
        per_domain = torch.stack([chunk.mean() for chunk in torch.split(per_example, sizes)])
        losses = {f"ce_{d}": value.detach() for d, value in enumerate(per_domain)}
        if graph is None:
            return {"loss": per_domain.sum(), **losses}
        stacked = torch.stack([h.float() for h in out.hidden_states])       # (L+1, N, T, H)
        means = torch.stack([chunk.mean(dim=(0, 1, 2))
                             for chunk in torch.split(stacked, sizes, dim=1)])  # (D, H)
        weights, _ = graph(means[None])
        return {"loss": (weights[0] * per_domain).sum(), **losses}

    return compute_loss


def make_hrkd_loss(teachers, groups, weighting: Optional[StepWeighting],
                   distill: DistillConfig, recorder: Optional[WeightSink] = None,
                   targets=None):
    """Stage 4: every domain's distillation loss, its layer terms weighted by w[l, d] from
    ``weighting`` (None: multi-domain KD, every w = 1). One student forward for all domains.
    With ``targets`` (teacher_cache.TeacherTargets, once filled) the teachers' outputs are read
    from the cache."""

    def compute_loss(student, batches):
        student_layers = unwrap(student).config.num_hidden_layers
        teacher_outs = targets.outputs(batches) if targets is not None else None
        if teacher_outs is None:
            teacher_outs = teacher_outputs(teachers, groups, batches, student_layers)
        losses = {}
        if weighting is not None:
            losses.update(weighting.before_step(student, batches, teacher_outs))
        student_outs = student_outputs(student, batches)
        weights = None
        if weighting is not None:
            weights, hierarchy = weighting.weights(student_outs)
            if recorder is not None:
                recorder.add(weights, hierarchy)
        losses.update(hrkd_loss(student_outs, teacher_outs, weights, distill.hidden_ratio,
                                distill.pred_ratio, distill.temperature))
        return losses

    return compute_loss
