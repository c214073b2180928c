"""What each stage optimises: its models, its teachers, its loss, its domain weighting.

Library code, imported by the stage scripts, the tools (bench.py) and the tests alike; the
training loop (training.py) knows nothing of it and only calls a stage's ``compute_loss``.

* models: ``build_teacher`` / ``build_student`` (checked against each other before anything
  is read or written), ``freeze`` for teachers;
* teachers of stage 4: ``teacher_checkpoints`` (best_model_<domain>.bin), ``load_teachers``
  (domains whose best checkpoint is the same share one teacher and one forward),
  ``teacher_outputs`` / ``student_outputs``;
* the four stages' losses: ``cross_entropy_loss`` (1), ``make_kd_loss`` (2),
  ``make_multi_domain_ce`` (3), ``make_hrkd_loss`` (4), with typed configs
  (``DistillConfig``, ``GraphConfig``, ``MetaConfig``) instead of the flag namespace;
* domain weighting of stage 4 as registered strategies (``WEIGHTINGS``: ``graph``, the
  released graph; ``uniform``, w = 1/D; ``meta``, the graph learned by a one-step lookahead;
  ``meta_scorer``, a per-domain scorer learned the same way): each is one class whose
  ``weights`` returns w[l, d] for a step. Adding a method is one class with
  ``@register_weighting`` (and a row in ``variants.py`` for the launchers and reports);
* ``WeightRecorder``: w[l, d] averaged between evaluations into domain_weights.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from data_processing import concat_domain_batches, take
from distillation import (DomainRelationalGraph, DomainScorer, domain_prototypes,
                          frozen_teacher_outputs, hrkd_loss, teacher_layer_for, tinybert_kd_loss)
from modeling import (BertClassifier, check_sequence_length, config_source, load_weights,
                      model_from_checkpoint, resolve_config, split_output)
from runtime import AMP_DTYPES, to_device, unwrap
from training import weights_digest
from utils import best_model_name, logger


# --------------------------------------------------------------------------------------------
# Typed configs: what the losses and learners read
# --------------------------------------------------------------------------------------------
def _from_args(cls, args, names: Dict[str, str]):
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
        return _from_args(cls, args, {"hidden_ratio": "hidden_ratio", "pred_ratio": "pred_ratio",
                                      "temperature": "temperature"})


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """The domain-relational graph of stage 4 (released: 8 heads, dropout 0.1, never trained)."""

    heads: int = 8
    dropout: float = 0.1
    hierarchical: bool = True
    train: bool = False

    @classmethod
    def from_args(cls, args) -> "GraphConfig":
        return _from_args(cls, args, {"heads": "graph_heads", "dropout": "graph_dropout",
                                      "hierarchical": "hierarchical", "train": "train_graph"})


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """The per-domain scorer of ``meta_scorer`` weighting (distillation.DomainScorer)."""

    temperature: float = 1.0
    floor: float = 0.25               # every domain keeps at least floor / D

    @classmethod
    def from_args(cls, args) -> "ScorerConfig":
        return _from_args(cls, args, {"temperature": "scorer_temperature",
                                      "floor": "scorer_floor"})


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """The one-step-lookahead learner of ``meta`` weighting."""

    lr: float = 1e-3                  # Adam rate of the graph
    every: int = 1                    # a meta step every N training steps
    virtual_lr: float = 5e-5          # SGD rate of the virtual student step
    objective: str = "distill"        # distill | gold
    batch_size: int = 8               # held-out examples per domain
    seed: int = 42

    @classmethod
    def from_args(cls, args) -> "MetaConfig":
        return cls(lr=args.meta_lr, every=args.meta_every,
                   virtual_lr=args.meta_virtual_lr or args.learning_rate,
                   objective=args.meta_objective, batch_size=args.batch_size, seed=args.seed)


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
                  num_labels: int, max_seq_length: int, num_domains=None) -> BertClassifier:
    """A BERT teacher (stages 1, 3): ``config_flag``, else ``init``'s config.json, else
    bert_base; initialised from ``init`` when given."""
    config = resolve_config(config_source(config_flag, init, "bert_base"), vocab_size)
    check_sequence_length(config, max_seq_length, "model")
    model = BertClassifier(config, num_labels, num_domains=num_domains)
    if init:
        load_weights(model, init)
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


def make_kd_loss(teacher, distill: DistillConfig, targets=None):
    """Stage 2 (TinyBERT-KD): hidden-state, attention and prediction distillation. With
    ``targets`` (teacher_cache.TeacherTargets, once filled) the teacher's outputs are read
    from the cache instead of recomputed."""

    def compute_loss(student, batches):
        batch = batches[0]
        inputs = (batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
        student_layers = unwrap(student).config.num_hidden_layers
        cached = targets.outputs(batches) if targets is not None else None
        teacher_out = cached[0] if cached else frozen_teacher_outputs(teacher, *inputs, None,
                                                                      student_layers)
        student_out = student(*inputs)
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


def make_hrkd_loss(teachers, groups, weighting: Optional["DomainWeighting"],
                   distill: DistillConfig, recorder: Optional["WeightRecorder"] = None,
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


# --------------------------------------------------------------------------------------------
# Domain weighting strategies of stage 4
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WeightingSetup:
    """Everything a strategy may need to build itself."""

    levels: int                       # L_s + 1
    domains: List[str]
    width: int                        # H_t, the prototypes' width
    graph: GraphConfig
    distill: DistillConfig
    meta: Optional[MetaConfig]
    scorer: Optional[ScorerConfig]
    teachers: list
    groups: List[List[int]]
    # The meta learner's held-out data ({domain: tensors} of --meta_data's split), tokenized
    # on demand.
    meta_features: Callable[[], Dict[str, Dict[str, torch.Tensor]]]
    device: torch.device


WEIGHTINGS: Dict[str, type] = {}


def register_weighting(name: str):
    """Class decorator: the strategy answers to ``--domain_weighting name``."""

    def register(cls):
        cls.name = name
        WEIGHTINGS[name] = cls
        return cls

    return register


class DomainWeighting:
    """w[l, d] for a step (each level sums to 1 over domains) and the hierarchical attentions.

    ``modules`` are checkpointed with the student (and optimised with it when
    ``optimise_with_student``); ``state`` holds other resumable objects."""

    optimise_with_student = False

    @classmethod
    def build(cls, setup: WeightingSetup) -> "DomainWeighting":
        raise NotImplementedError

    def modules(self) -> Dict[str, nn.Module]:
        return {}

    def state(self) -> Dict[str, object]:
        return {}

    def before_step(self, student, batches, teacher_outs) -> Dict[str, torch.Tensor]:
        """Work before the student's forward (the meta step); extra terms to log."""
        return {}

    def weights(self, student_outs):
        raise NotImplementedError


def build_graph(setup: WeightingSetup, trainable: bool) -> DomainRelationalGraph:
    graph = DomainRelationalGraph(setup.levels, len(setup.domains), setup.width,
                                  heads=setup.graph.heads, dropout=setup.graph.dropout,
                                  hierarchical=setup.graph.hierarchical)
    # Released behaviour: the graph is never given to the optimiser. Gradients still reach the
    # student through w (the prototypes are not detached).
    return graph.requires_grad_(trainable).to(setup.device)


@register_weighting("graph")
class GraphWeighting(DomainWeighting):
    """The released graph: prototypes -> hierarchical compare-aggregate -> GAT per level
    (random and frozen unless --train_graph, which optimises it with the student)."""

    def __init__(self, graph: DomainRelationalGraph, trained: bool):
        self.graph, self.optimise_with_student = graph, trained

    @classmethod
    def build(cls, setup):
        return cls(build_graph(setup, setup.graph.train), setup.graph.train)

    def modules(self):
        return {"graph": self.graph}

    def weights(self, student_outs):
        return self.graph(domain_prototypes([out.hidden_states for out in student_outs]))


@register_weighting("uniform")
class UniformWeighting(DomainWeighting):
    """The control: every w[l, d] = 1/D (what the oversmoothed graph computes, noise-free)."""

    def __init__(self, levels: int, num_domains: int, device):
        self.shape, self.device = (levels, num_domains), device

    @classmethod
    def build(cls, setup):
        return cls(setup.levels, len(setup.domains), setup.device)

    def weights(self, student_outs):
        weights = torch.full(self.shape, 1.0 / self.shape[1], device=student_outs[0].logits.device)
        return weights, [None] * self.shape[0]


@register_weighting("meta")
class MetaGraphWeighting(DomainWeighting):
    """The graph learned by a one-step lookahead (``MetaGraphLearner``); the student's real
    update uses the updated graph's weights as constants (the graph must not also receive the
    weighted loss's own gradient)."""

    def __init__(self, graph: DomainRelationalGraph, learner: "MetaGraphLearner"):
        self.graph, self.learner = graph, learner

    @classmethod
    def build(cls, setup):
        if setup.graph.train:
            raise ValueError(f"--domain_weighting {cls.name} learns its weights by the meta-"
                             f"objective; drop --train_graph (which would also step them on "
                             f"the weighted loss)")
        return cls.with_learner(cls.weight_module(setup), setup)

    @classmethod
    def weight_module(cls, setup) -> nn.Module:
        return build_graph(setup, True)

    @classmethod
    def with_learner(cls, module: nn.Module, setup) -> "MetaGraphWeighting":
        features = setup.meta_features()
        learner = MetaGraphLearner(module, setup.teachers, setup.groups,
                                   [features[d] for d in setup.domains], setup.distill,
                                   setup.meta, setup.device)
        return cls(module, learner)

    def modules(self):
        return {"graph": self.graph}

    def state(self):
        return {"meta": self.learner}

    def before_step(self, student, batches, teacher_outs):
        meta_loss = self.learner.maybe_step(student, batches, teacher_outs)
        return {} if meta_loss is None else {"meta_loss": meta_loss}

    def weights(self, student_outs):
        prototypes = domain_prototypes([out.hidden_states for out in student_outs])
        constants = {name: p.detach() for name, p in self.graph.named_parameters()}
        return torch.func.functional_call(self.graph, constants, (prototypes,))


@register_weighting("meta_scorer")
class MetaScorerWeighting(MetaGraphWeighting):
    """A per-domain scorer (distillation.DomainScorer: each domain's own prototype and a
    learned logit per level and domain, temperature, weight floor) learned by the same
    one-step lookahead as ``meta``. Unlike the graph, nothing averages the domains into one
    value, so an unreliable domain can be given less than 1/D."""

    @classmethod
    def weight_module(cls, setup) -> nn.Module:
        scorer = setup.scorer or ScorerConfig()
        return DomainScorer(setup.levels, len(setup.domains), setup.width,
                            hierarchical=setup.graph.hierarchical,
                            temperature=scorer.temperature, floor=scorer.floor).to(setup.device)


class MetaGraphLearner:
    """Learns the graph by a one-step lookahead, as in learning to reweight.

    A virtual SGD step of the student on the graph-weighted loss, theta' = theta - lr * grad,
    kept as a function of the graph; then the graph's parameters step (Adam, ``meta.lr``) to
    lower the meta objective of the virtually updated student on held-out batches drawn from
    every domain's --meta_data split (training data by default; dev where its labels are the
    only trusted ones, as in the label-noise study): the unweighted distillation loss, or the
    gold-label cross-entropy. Minimising the weighted loss itself would put all weight on the
    easiest domain. The student runs functionally on theta' (torch.func.functional_call): no
    copy of it is made and its real parameters are not touched.
    """

    def __init__(self, graph, teachers, groups, features: List[Dict[str, torch.Tensor]],
                 distill: DistillConfig, meta: MetaConfig, device):
        self.graph, self.teachers, self.groups = graph, teachers, groups
        self.features, self.distill, self.meta, self.device = features, distill, meta, device
        self.optimizer = torch.optim.Adam(graph.parameters(), lr=meta.lr)
        self.generator = torch.Generator().manual_seed(meta.seed + 7919)
        self.calls = 0

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "calls": self.calls,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        self.calls = state["calls"]
        self.generator.set_state(state["generator"])

    def held_out_batches(self):
        batches = []
        for features in self.features:
            count = features["labels"].shape[0]
            rows = torch.randint(0, count, (self.meta.batch_size,), generator=self.generator)
            batches.append(to_device(take(features, rows), self.device))
        return batches

    def maybe_step(self, student, batches, teacher_outs):
        self.calls += 1
        if self.calls % self.meta.every:  # steps N, 2N, ...
            return None
        return self.step(student, batches, teacher_outs)

    def _distill(self, student_outs, teacher_outs, weights):
        d = self.distill
        return hrkd_loss(student_outs, teacher_outs, weights, d.hidden_ratio, d.pred_ratio,
                         d.temperature)["loss"]

    def step(self, student, batches, teacher_outs) -> torch.Tensor:
        params = {n: p for n, p in unwrap(student).named_parameters() if p.requires_grad}
        student_outs = student_outputs(student, batches, params)
        weights, _ = self.graph(domain_prototypes([o.hidden_states for o in student_outs]))
        weighted = self._distill(student_outs, teacher_outs, weights)
        grads = torch.autograd.grad(weighted, list(params.values()), create_graph=True,
                                    allow_unused=True)
        virtual = {name: value if grad is None else value - self.meta.virtual_lr * grad
                   for (name, value), grad in zip(params.items(), grads)}
        held_out = self.held_out_batches()
        outs = student_outputs(student, held_out, virtual)
        if self.meta.objective == "gold":
            objective = sum(F.cross_entropy(out.logits.float(), b["labels"])
                            for out, b in zip(outs, held_out))
        else:
            targets = teacher_outputs(self.teachers, self.groups, held_out,
                                      len(outs[0].attention_scores))
            objective = self._distill(outs, targets, None)
        graph_params = list(self.graph.parameters())
        meta_grads = torch.autograd.grad(objective, graph_params, allow_unused=True)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for parameter, grad in zip(graph_params, meta_grads):
            parameter.grad = torch.zeros_like(parameter) if grad is None else grad.detach()
            if distributed:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= torch.distributed.get_world_size()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return objective.detach()


def build_weighting(name: str, setup: WeightingSetup) -> DomainWeighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown --domain_weighting '{name}' "
                         f"(expected one of {', '.join(WEIGHTINGS)})")
    return WEIGHTINGS[name].build(setup)


# --------------------------------------------------------------------------------------------
# What the weighting did, for report.py's plots
# --------------------------------------------------------------------------------------------
class WeightRecorder:
    """Averages w[l, d] (and the hierarchical weights) between evaluations; writes them out."""

    def __init__(self, run_dir, domains: List[str]):
        self.run_dir, self.domains = run_dir, domains
        self.weights_sum, self.hierarchy_sum, self.count = None, None, 0

    def add(self, weights: torch.Tensor, hierarchy: List[Optional[torch.Tensor]]):
        weights = weights.detach().float().cpu()
        hierarchy = [None if h is None else h.detach().float().cpu() for h in hierarchy]
        if self.count == 0:
            self.weights_sum, self.hierarchy_sum = weights, hierarchy
        else:
            self.weights_sum = self.weights_sum + weights
            self.hierarchy_sum = [None if a is None else a + b
                                  for a, b in zip(self.hierarchy_sum, hierarchy)]
        self.count += 1

    def flush(self, step: int, writer) -> dict:
        if self.count == 0:
            return {}
        weights = (self.weights_sum / self.count).tolist()
        hierarchy = [None if h is None else (h / self.count).tolist() for h in self.hierarchy_sum]
        record = {"step": step, "weights": weights, "hierarchy": hierarchy}
        if self.run_dir.is_main:
            with open(self.run_dir.file("domain_weights.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for level, row in enumerate(weights):
                for domain, value in zip(self.domains, row):
                    writer.add_scalar(f"domain_weight/level{level}/{domain}", value, step)
            for level, rows in enumerate(hierarchy):
                for domain, attention in zip(self.domains, rows or []):
                    for below, value in enumerate(attention):
                        writer.add_scalar(f"hierarchy/level{level}/{domain}/from{below}",
                                          value, step)
        self.count = 0
        return {"domain_weights": weights}
