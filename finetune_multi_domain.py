"""Stage 4: HRKD, distil the multi-domain teacher into a multi-domain TinyBERT student.

Each domain's teacher is the stage-3 checkpoint best on that domain (best_model_<domain>.bin in
--teacher_dir). Every step holds --batch_size examples of every domain. The student's per-level
domain prototypes feed the domain-relational graph (with the hierarchical compare-aggregate),
whose weights w[l, d] scale each domain's layer losses (REFERENCE.md section 4):

    loss = sum_d hidden_ratio * (w[0,d] MSE(emb) + sum_i w[i,d] (MSE(att) + MSE(hid)))
                 + pred_ratio * SCE / D

Ablations: --no_use_graph (multi-domain KD, every w = 1, SCE not divided by D) and
--no_hierarchical (graph fed the level's prototypes directly). --train_graph optimises the
graph (released behaviour: it keeps its random initialisation). --domain_weighting picks a
strategy of weighting.WEIGHTINGS (graph, the released one; uniform; meta; meta_scorer). The
losses and the teachers live in objectives.py, the strategies in weighting.py; this script
holds flags and wiring.

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
import os
import sys

import stages
from objectives import (DistillConfig, build_student, check_teacher_labels, load_teachers,
                        make_hrkd_loss, teacher_checkpoints)
from teacher_cache import TeacherTargets
from utils import logger
from variants import VARIANTS
from weighting import (WEIGHTINGS, GraphConfig, MetaConfig, ScorerConfig, WeightingSetup,
                       WeightRecorder, build_weighting)


def build_parser():
    parser = stages.stage_parser(__doc__, lr=5e-5, epochs=10, batch_size=32, multi_domain=True)
    stages.add_student_args(parser)
    parser.add_argument("--variant", nargs="+", choices=list(VARIANTS), default=None,
                        help="run these variants of variants.py (their flags after the ones "
                             "given), one run each in this process; several: put {variant} in "
                             "--output_dir")
    graph = parser.add_argument_group("domain weighting (the domain-relational graph)")
    stages.add_switch(graph, "use_graph", True,
                      "weight domains with the graph (--no_use_graph: multi-domain KD)")
    stages.add_switch(graph, "hierarchical", True,
                      "hierarchical compare-aggregate before each level's graph")
    graph.add_argument("--train_graph", action="store_true",
                       help="optimise the graph with the student (off = released behaviour)")
    graph.add_argument("--graph_dropout", type=float, default=0.1,
                       help="dropout inside the graph (released: 0.1)")
    graph.add_argument("--graph_heads", type=int, default=8)
    graph.add_argument("--domain_weighting", choices=list(WEIGHTINGS), default="graph",
                       help="graph: the released graph's weights; uniform: every w = 1/D (the "
                            "control); meta: the graph learned by one-step lookahead; "
                            "meta_scorer: a per-domain scorer learned the same way")
    graph.add_argument("--scorer_temperature", type=float, default=1.0,
                       help="meta_scorer: softmax temperature of the domain scores")
    graph.add_argument("--scorer_floor", type=float, default=0.25,
                       help="meta_scorer: every domain keeps at least floor / D of each level")
    meta = parser.add_argument_group("meta-learned weighting (--domain_weighting meta, "
                                     "meta_scorer)")
    meta.add_argument("--meta_lr", type=float, default=1e-3, help="Adam rate of the graph")
    meta.add_argument("--meta_every", type=int, default=1,
                      help="a meta step every N training steps (cost control)")
    meta.add_argument("--meta_virtual_lr", type=float, default=None,
                      help="SGD rate of the virtual student step (default: --learning_rate)")
    meta.add_argument("--meta_objective", choices=["distill", "gold"], default="distill",
                      help="held-out loss of the virtually updated student: the unweighted "
                           "distillation loss, or cross-entropy with the gold labels")
    meta.add_argument("--meta_data", choices=["train", "dev"], default="train",
                      help="split the meta objective's held-out batches are drawn from; dev "
                           "when the training labels may be wrong (its labels are then also "
                           "seen by the weighting, so dev accuracy is no longer unbiased)")
    return parser


def validate_args(args):
    if not 0.0 <= args.graph_dropout < 1.0:
        raise ValueError(f"--graph_dropout must be in [0, 1), got {args.graph_dropout}")
    if args.train_graph and not args.use_graph:
        raise ValueError("--train_graph needs the graph (drop --no_use_graph)")
    if args.domain_weighting != "graph" and not args.use_graph:
        raise ValueError(f"--domain_weighting {args.domain_weighting} replaces the graph's "
                         f"weights; it cannot be combined with --no_use_graph")
    if args.domain_weighting.startswith("meta") and args.train_graph:
        raise ValueError(f"--domain_weighting {args.domain_weighting} learns its weights by the "
                         f"meta-objective; drop --train_graph (which would also step them on "
                         f"the weighted loss)")
    if args.scorer_temperature <= 0 or not 0.0 <= args.scorer_floor < 1.0:
        raise ValueError("--scorer_temperature must be positive and --scorer_floor in [0, 1)")
    if args.meta_every <= 0 or args.meta_lr <= 0:
        raise ValueError("--meta_every and --meta_lr must be positive")


def run(args):
    validate_args(args)
    context = stages.begin_stage(args, stages.student_vocab, multi_domain=True)
    domains, device = context.domains, context.dist.device
    if args.do_train:
        paths = teacher_checkpoints(args.teacher_dir, domains)
        teachers, groups = load_teachers(paths, device, args.amp)
        logger.info("%d distinct teacher(s) for %d domains: %s", len(teachers), len(domains),
                    "; ".join(",".join(domains[d] for d in g) for g in groups))
        check_teacher_labels(teachers[0], context.labels, paths[0])
        teacher_config = teachers[0].config
        student = build_student(args.student_config, args.student_init, args.student_init_layers,
                                len(context.tokenizer), len(context.labels), teacher_config,
                                args.max_seq_length, num_domains=len(domains))
        distill = DistillConfig.from_args(args)
        weighting, recorder = None, None
        if args.use_graph:
            weighting = build_weighting(args.domain_weighting, WeightingSetup(
                levels=student.config.num_hidden_layers + 1, domains=domains,
                width=teacher_config.hidden_size, graph=GraphConfig.from_args(args),
                distill=distill, meta=MetaConfig.from_args(args),
                scorer=ScorerConfig.from_args(args), teachers=teachers,
                groups=groups, device=device,
                meta_features=lambda: stages.split_of(context.features, args.meta_data)))
            recorder = WeightRecorder(context.run_dir, domains)
        targets = TeacherTargets()  # filled once the run directory is open
        layers = student.config.num_hidden_layers
        stages.train_stage(
            context, student,
            make_hrkd_loss(teachers, groups, weighting, distill, recorder, targets),
            "finetune_multi_domain", {"teachers": [os.path.abspath(p) for p in paths]},
            prepare=lambda: stages.fill_teacher_targets(context, targets, teachers, groups,
                                                        layers),
            extra_modules=weighting.modules() if weighting else {},
            extra_state=weighting.state() if weighting else {},
            optimise_extra=bool(weighting and weighting.optimise_with_student),
            on_evaluation=recorder.flush if recorder else None)
    stages.finish_stage(context)


def main(argv=None) -> int:
    return stages.stage_main(build_parser, run, argv,
                             variants={name: v.flags for name, v in VARIANTS.items()})


if __name__ == "__main__":
    sys.exit(main())
