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

import utils
from data_processing import concat_domain_batches, get_processor
from distillation import (DomainRelationalGraph, domain_prototypes, frozen_teacher_outputs,
                          hrkd_loss)
from finetune_domain import add_student_args, build_student, student_vocab
from modeling import model_from_checkpoint, split_output

logger = utils.logger


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


def load_teachers(paths: List[str], device) -> Tuple[list, List[List[int]]]:
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
            teachers.append(utils.freeze(model).to(device))
            groups.append([])
        groups[index_of[key]].append(domain)
    return teachers, groups


def teacher_outputs(teachers, groups, batches, student_layers: int):
    """Each domain's teacher output; one forward per distinct teacher, with per-row heads."""
    outputs = [None] * len(batches)
    for teacher, domains in zip(teachers, groups):
        merged, local_ids, sizes = concat_domain_batches([batches[d] for d in domains])
        heads = torch.tensor(domains, device=local_ids.device)[local_ids]
        out = frozen_teacher_outputs(teacher, merged["input_ids"], merged["segment_ids"],
                                     merged["attention_mask"], heads, student_layers)
        for domain, part in zip(domains, split_output(out, sizes)):
            outputs[domain] = part
    return outputs


def make_hrkd_loss(teachers, groups, graph, args, recorder: Optional[WeightRecorder]):
    """The stage-4 objective as the loop's compute_loss (one student forward for all domains)."""

    def compute_loss(student, batches):
        student_layers = utils.unwrap(student).config.num_hidden_layers
        teacher_outs = teacher_outputs(teachers, groups, batches, student_layers)
        merged, domain_ids, sizes = concat_domain_batches(batches)
        student_outs = split_output(student(merged["input_ids"], merged["segment_ids"],
                                            merged["attention_mask"], domain=domain_ids), sizes)
        weights = None
        if graph is not None:
            prototypes = domain_prototypes([out.hidden_states for out in student_outs])
            weights, hierarchy = graph(prototypes)
            if recorder is not None:
                recorder.add(weights, hierarchy)
        return hrkd_loss(student_outs, teacher_outs, weights, args.hidden_ratio,
                         args.pred_ratio, args.temperature)

    return compute_loss


def build_graph(args, levels: int, num_domains: int, width: int) -> DomainRelationalGraph:
    graph = DomainRelationalGraph(levels, num_domains, width, heads=args.graph_heads,
                                  dropout=args.graph_dropout, hierarchical=args.hierarchical)
    # Released behaviour: the graph is never given to the optimiser. Gradients still reach the
    # student through w (the prototypes are not detached).
    graph.requires_grad_(args.train_graph)
    return graph


def validate_args(args):
    if not 0.0 <= args.graph_dropout < 1.0:
        raise ValueError(f"--graph_dropout must be in [0, 1), got {args.graph_dropout}")
    if args.train_graph and not args.use_graph:
        raise ValueError("--train_graph needs the graph (drop --no_use_graph)")


def run(args):
    utils.validate_common_args(args)
    validate_args(args)
    dist = utils.Distributed()
    utils.setup_logging(main=dist.is_main)
    utils.set_seed(args.seed)
    processor = get_processor(args.task)
    if args.domain not in processor.domains:
        raise ValueError(f"unknown {args.task} domain '{args.domain}' "
                         f"(expected one of {', '.join(processor.domains)})")
    domains = processor.domains
    vocab_file = student_vocab(args)
    tokenizer, features = utils.load_features(args, domains, vocab_file, dist)
    run_dir = utils.RunDir(args.output_dir, dist.is_main)
    head_of = {domain: index for index, domain in enumerate(domains)}
    if args.do_train:
        paths = teacher_checkpoints(args.teacher_dir, domains)
        teachers, groups = load_teachers(paths, dist.device)
        logger.info("%d distinct teacher(s) for %d domains: %s", len(teachers), len(domains),
                    "; ".join(",".join(domains[d] for d in g) for g in groups))
        teacher_config = teachers[0].config
        utils.check_sequence_length(teacher_config, args.max_seq_length, "teacher")
        student = build_student(args, len(tokenizer), len(processor.labels),
                                teacher_config.hidden_size, num_domains=len(domains))
        graph, extra, recorder = None, {}, None
        if args.use_graph:
            graph = build_graph(args, student.config.num_hidden_layers + 1, len(domains),
                                teacher_config.hidden_size).to(dist.device)
            extra["graph"] = graph
            recorder = WeightRecorder(run_dir, domains)
        run_dir.prepare_for_training(args, dist)
        utils.setup_logging(run_dir.file("train.log"), dist.is_main)
        utils.copy_vocab(vocab_file, run_dir)
        stage = utils.Stage(
            model=student, domains=domains, fit_domain=args.domain,
            train_features=utils.split_of(features, "train"),
            dev_features=utils.split_of(features, "dev"), head_of=head_of,
            compute_loss=make_hrkd_loss(teachers, groups, graph, args, recorder),
            checkpoint_meta={"task": args.task, "domains": domains, "labels": processor.labels,
                             "stage": "finetune_multi_domain",
                             "teachers": [os.path.abspath(p) for p in paths]},
            extra_modules=extra,
            on_evaluation=recorder.flush if recorder else None)
        utils.train(args, stage, run_dir, dist)
    if args.do_test and dist.is_main:
        utils.run_test(args, run_dir, domains, head_of, utils.split_of(features, "test"),
                       utils.split_of(features, "dev"), dist.device, model_from_checkpoint)
    dist.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return utils.main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
