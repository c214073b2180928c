"""Stage 4: HRKD, distil the multi-domain teacher into a multi-domain TinyBERT student.

Each domain's teacher is the stage-3 checkpoint best on that domain (best_model_<domain>.bin in
--teacher_dir). Every step holds --batch_size examples of every domain. The student's per-level
domain prototypes feed the domain-relational graph (with the hierarchical compare-aggregate),
whose weights w[l, d] scale each domain's layer losses (REFERENCE.md section 4):

    loss = sum_d hidden_ratio * (w[0,d] MSE(emb) + sum_i w[i,d] (MSE(att) + MSE(hid)))
                 + pred_ratio * SCE / D

Ablations: --no_use_graph (multi-domain KD, every w = 1, SCE not divided by D) and
--no_hierarchical (graph fed the level's prototypes directly). --train_graph optimises the
graph (released behaviour: it keeps its random initialisation).

Reads  --teacher_dir (stage-3 run directory), --student_init (general TinyBERT; optional).
Writes --output_dir: as stage 3, plus domain_weights.jsonl (w and the hierarchical weights at
       every evaluation) and the graph's weights inside every checkpoint (graph_state_dict).

Single process (8 per domain x 4 GPUs):
    python finetune_multi_domain.py --task amazon --data_dir dataset/amazon --domain books \
        --teacher_dir runs/train_multi_domain/amazon/seed42 \
        --student_init pretrained_ckpt/tinybert-4l-312 \
        --output_dir runs/finetune_multi_domain/amazon/hrkd/seed42 --do_train --do_test
Four GPUs:  torchrun --standalone --nproc_per_node 4 finetune_multi_domain.py ... --batch_size 8
"""
import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

import utils
from data_processing import concat_domain_batches, take
from distillation import (DomainRelationalGraph, domain_prototypes, frozen_teacher_outputs,
                          hrkd_loss)
from finetune_domain import add_student_args, build_student, student_vocab
from modeling import model_from_checkpoint, split_output

logger = utils.logger


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(parser, lr=5e-5, epochs=10, batch_size=32)
    add_student_args(parser)
    graph = parser.add_argument_group("domain-relational graph")
    utils.add_switch(graph, "use_graph", True,
                     "weight domains with the graph (--no_use_graph: multi-domain KD)")
    utils.add_switch(graph, "hierarchical", True,
                     "hierarchical compare-aggregate before each level's graph")
    graph.add_argument("--train_graph", action="store_true",
                       help="optimise the graph with the student (off = released behaviour)")
    graph.add_argument("--graph_dropout", type=float, default=0.1,
                       help="dropout inside the graph (released: 0.1)")
    graph.add_argument("--graph_heads", type=int, default=8)
    graph.add_argument("--domain_weighting", choices=["graph", "uniform", "meta"],
                       default="graph",
                       help="graph: the released graph's weights; uniform: every w = 1/D (the "
                            "control); meta: the graph learned by one-step lookahead")
    meta = parser.add_argument_group("meta-learned graph (--domain_weighting meta)")
    meta.add_argument("--meta_lr", type=float, default=1e-3, help="Adam rate of the graph")
    meta.add_argument("--meta_every", type=int, default=1,
                      help="a meta step every N training steps (cost control)")
    meta.add_argument("--meta_virtual_lr", type=float, default=None,
                      help="SGD rate of the virtual student step (default: --learning_rate)")
    meta.add_argument("--meta_objective", choices=["distill", "gold"], default="distill",
                      help="held-out loss of the virtually updated student: the unweighted "
                           "distillation loss, or cross-entropy with the gold labels")
    return parser


def teacher_checkpoints(teacher_dir: str, domains: List[str]) -> List[str]:
    """best_model_<domain>.bin of every domain; one error naming every missing domain."""
    if not os.path.isdir(teacher_dir):
        raise FileNotFoundError(f"{teacher_dir}: teacher run directory not found")
    paths = [os.path.join(teacher_dir, f"best_model_{domain}.bin") for domain in domains]
    missing = [d for d, p in zip(domains, paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{teacher_dir}: no stage-3 checkpoint for domain(s) "
                                f"{', '.join(missing)} (expected best_model_<domain>.bin)")
    return paths


class WeightRecorder:
    """Averages w[l, d] (and the hierarchical weights) between evaluations; writes them out."""

    def __init__(self, run_dir: utils.RunDir, domains: List[str]):
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


def load_teachers(paths: List[str], device, amp: str = "off") -> Tuple[list, List[List[int]]]:
    """Frozen teachers, one per distinct checkpoint, and the domains each one serves.

    Stage 3 often has the same evaluation step best for several domains; those domains then
    share one teacher (in memory and in one forward pass over their concatenated batches).
    """
    teachers, groups, index_of = [], [], {}
    for domain, path in enumerate(paths):
        model = model_from_checkpoint(path)
        key = utils.weights_digest(model)
        if key not in index_of:
            index_of[key] = len(teachers)
            teachers.append(utils.freeze(model, amp).to(device))
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
        out = torch.func.functional_call(utils.unwrap(student), params, inputs,
                                         {"domain": domain_ids})
    return split_output(out, sizes)


def domain_weights(weighting: str, graph, student_outs, frozen_graph: bool = False):
    """w (levels, D) and the hierarchical attentions, or (None, None) without a graph.

    ``frozen_graph``: the graph's parameters as constants (the meta-learned graph must not
    receive the weighted loss's own gradient)."""
    if graph is None:
        return None, None
    if weighting == "uniform":
        levels, domains = graph.levels, graph.num_domains
        weights = torch.full((levels, domains), 1.0 / domains,
                             device=student_outs[0].logits.device)
        return weights, [None] * levels
    prototypes = domain_prototypes([out.hidden_states for out in student_outs])
    if frozen_graph:
        constants = {name: p.detach() for name, p in graph.named_parameters()}
        return torch.func.functional_call(graph, constants, (prototypes,))
    return graph(prototypes)


def make_hrkd_loss(teachers, groups, graph, args, recorder: Optional[WeightRecorder],
                   meta: Optional["MetaGraphLearner"] = None):
    """The stage-4 objective as the loop's compute_loss (one student forward for all domains).

    With ``meta`` the graph first takes its meta step on this step's batches (every
    --meta_every steps); the student's real update then uses the updated graph's weights."""
    weighting = getattr(args, "domain_weighting", "graph")

    def compute_loss(student, batches):
        student_layers = utils.unwrap(student).config.num_hidden_layers
        teacher_outs = teacher_outputs(teachers, groups, batches, student_layers)
        losses = {}
        if meta is not None:
            meta_loss = meta.maybe_step(student, batches, teacher_outs)
            if meta_loss is not None:
                losses["meta_loss"] = meta_loss
        student_outs = student_outputs(student, batches)
        weights, hierarchy = domain_weights(weighting, graph, student_outs,
                                            frozen_graph=meta is not None)
        if weights is not None and recorder is not None:
            recorder.add(weights, hierarchy)
        losses.update(hrkd_loss(student_outs, teacher_outs, weights, args.hidden_ratio,
                                args.pred_ratio, args.temperature))
        return losses

    return compute_loss


class MetaGraphLearner:
    """Learns the graph by a one-step lookahead, as in learning to reweight.

    A virtual SGD step of the student on the graph-weighted loss, theta' = theta - lr * grad,
    kept as a function of the graph; then the graph's parameters step (Adam, --meta_lr) to lower
    the meta objective of the virtually updated student on held-out batches drawn from every
    domain's training data: the unweighted distillation loss, or the gold-label cross-entropy.
    Minimising the weighted loss itself would put all weight on the easiest domain. The student
    runs functionally on theta' (torch.func.functional_call): no copy of it is made and its
    real parameters are not touched.
    """

    def __init__(self, graph, teachers, groups, train_features, domains, args, device):
        self.graph, self.teachers, self.groups = graph, teachers, groups
        self.features = [train_features[d] for d in domains]
        self.args, self.device = args, device
        self.virtual_lr = args.meta_virtual_lr or args.learning_rate
        self.optimizer = torch.optim.Adam(graph.parameters(), lr=args.meta_lr)
        self.generator = torch.Generator().manual_seed(args.seed + 7919)
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
            rows = torch.randint(0, count, (self.args.batch_size,), generator=self.generator)
            batches.append(utils.to_device(take(features, rows), self.device))
        return batches

    def maybe_step(self, student, batches, teacher_outs):
        self.calls += 1
        if self.calls % self.args.meta_every:  # steps N, 2N, ...
            return None
        return self.step(student, batches, teacher_outs)

    def step(self, student, batches, teacher_outs) -> torch.Tensor:
        args = self.args
        params = {n: p for n, p in utils.unwrap(student).named_parameters() if p.requires_grad}
        student_outs = student_outputs(student, batches, params)
        weights, _ = domain_weights("graph", self.graph, student_outs)
        weighted = hrkd_loss(student_outs, teacher_outs, weights, args.hidden_ratio,
                             args.pred_ratio, args.temperature)["loss"]
        grads = torch.autograd.grad(weighted, list(params.values()), create_graph=True,
                                    allow_unused=True)
        virtual = {name: value if grad is None else value - self.virtual_lr * grad
                   for (name, value), grad in zip(params.items(), grads)}
        held_out = self.held_out_batches()
        outs = student_outputs(student, held_out, virtual)
        if args.meta_objective == "gold":
            objective = sum(F.cross_entropy(out.logits.float(), b["labels"])
                            for out, b in zip(outs, held_out))
        else:
            targets = teacher_outputs(self.teachers, self.groups, held_out,
                                      len(outs[0].attention_scores))
            objective = hrkd_loss(outs, targets, None, args.hidden_ratio, args.pred_ratio,
                                  args.temperature)["loss"]
        graph_params = [p for p in self.graph.parameters()]
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


def build_graph(args, levels: int, num_domains: int, width: int) -> DomainRelationalGraph:
    graph = DomainRelationalGraph(levels, num_domains, width, heads=args.graph_heads,
                                  dropout=args.graph_dropout, hierarchical=args.hierarchical)
    # Released behaviour: the graph is never given to the optimiser. Gradients still reach the
    # student through w (the prototypes are not detached). The meta-learner differentiates its
    # objective with respect to the graph, but steps it with its own optimiser only.
    graph.requires_grad_(args.train_graph or args.domain_weighting == "meta")
    return graph


def validate_args(args):
    if not 0.0 <= args.graph_dropout < 1.0:
        raise ValueError(f"--graph_dropout must be in [0, 1), got {args.graph_dropout}")
    if args.train_graph and not args.use_graph:
        raise ValueError("--train_graph needs the graph (drop --no_use_graph)")
    if args.domain_weighting != "graph" and not args.use_graph:
        raise ValueError(f"--domain_weighting {args.domain_weighting} replaces the graph's "
                         f"weights; it cannot be combined with --no_use_graph")
    if args.domain_weighting == "meta" and args.train_graph:
        raise ValueError("--domain_weighting meta learns the graph by its meta-objective; "
                         "drop --train_graph (which would also step it on the weighted loss)")
    if args.meta_every <= 0 or args.meta_lr <= 0:
        raise ValueError("--meta_every and --meta_lr must be positive")


def run(args):
    validate_args(args)
    context = utils.begin_stage(args, student_vocab, multi_domain=True)
    domains, device = context.domains, context.dist.device
    if args.do_train:
        paths = teacher_checkpoints(args.teacher_dir, domains)
        teachers, groups = load_teachers(paths, device, args.amp)
        logger.info("%d distinct teacher(s) for %d domains: %s", len(teachers), len(domains),
                    "; ".join(",".join(domains[d] for d in g) for g in groups))
        teacher_config = teachers[0].config
        student = build_student(args, len(context.tokenizer), len(context.labels),
                                teacher_config, num_domains=len(domains))
        graph, extra, recorder, meta, extra_state = None, {}, None, None, {}
        if args.use_graph:
            graph = build_graph(args, student.config.num_hidden_layers + 1, len(domains),
                                teacher_config.hidden_size).to(device)
            extra["graph"] = graph
            recorder = WeightRecorder(context.run_dir, domains)
            if args.domain_weighting == "meta":
                meta = MetaGraphLearner(graph, teachers, groups,
                                        utils.split_of(context.features, "train"), domains,
                                        args, device)
                extra_state["meta"] = meta
        utils.train_stage(
            context, student, make_hrkd_loss(teachers, groups, graph, args, recorder, meta),
            "finetune_multi_domain", {"teachers": [os.path.abspath(p) for p in paths]},
            extra_modules=extra, extra_state=extra_state,
            optimise_extra=args.domain_weighting != "meta",
            on_evaluation=recorder.flush if recorder else None)
    utils.finish_stage(context)


def main(argv=None) -> int:
    return utils.stage_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
