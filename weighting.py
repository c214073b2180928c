"""Stage 4's domain weighting: w[l, d] for each level l and domain d, as registered strategies.

* ``WEIGHTINGS`` (``--domain_weighting``): ``graph``, the released domain-relational graph;
  ``uniform``, w = 1/D; ``meta``, the graph learned by a one-step lookahead; ``meta_scorer``, a
  per-domain scorer learned the same way. Each is one class whose ``weights`` returns w[l, d]
  for a step; adding a method is one class with ``@register_weighting`` (and a row in
  ``variants.py`` for the launchers and reports);
* their typed configs (``GraphConfig``, ``ScorerConfig``, ``MetaConfig``) and
  ``WeightingSetup`` (what a strategy may build itself from);
* ``MetaGraphLearner``: the one-step lookahead (a virtual SGD step of the student, then an
  Adam step of the weighting on the held-out loss);
* ``WeightRecorder``: w[l, d] averaged between evaluations into domain_weights.jsonl.

Imports objectives.py (teachers, student outputs, DistillConfig), never the other way round.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data_processing import take
from distillation import DomainRelationalGraph, DomainScorer, domain_prototypes, hrkd_loss
from objectives import DistillConfig, config_from_args, student_outputs, teacher_outputs
from runtime import to_device, unwrap


# --------------------------------------------------------------------------------------------
# Typed configs: what the strategies and the learner read
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """The domain-relational graph of stage 4 (released: 8 heads, dropout 0.1, never trained)."""

    heads: int = 8
    dropout: float = 0.1
    hierarchical: bool = True
    train: bool = False

    @classmethod
    def from_args(cls, args) -> "GraphConfig":
        return config_from_args(cls, args, {"heads": "graph_heads", "dropout": "graph_dropout",
                                      "hierarchical": "hierarchical", "train": "train_graph"})


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """The per-domain scorer of ``meta_scorer`` weighting (distillation.DomainScorer)."""

    temperature: float = 1.0
    floor: float = 0.25               # every domain keeps at least floor / D

    @classmethod
    def from_args(cls, args) -> "ScorerConfig":
        return config_from_args(cls, args, {"temperature": "scorer_temperature",
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
