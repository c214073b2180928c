"""Stage 3: one BERT teacher over all domains (shared encoder and pooler, one head per domain).

Every step holds --batch_size examples of EVERY domain; an epoch is ceil(n_fit / B) steps of
the fit domain (--domain: telephone for MNLI, books for Amazon); the loss is the sum over domains
of each domain's cross-entropy, optionally weighted by one graph level (--use_graph, released
behaviour: off in the paper's scripts).

Reads  --data_dir, --init_checkpoint (e.g. pretrained_ckpt/bert-base-uncased).
Writes --output_dir: best_model.bin (best mean dev accuracy), best_model_<domain>.bin (best on
       each domain: stage 4's teachers), results.json, config.json, train.log, tensorboard/.

Single process (8 per domain x 4 GPUs = 32 per domain per step):
    python train_multi_domain.py --task amazon --data_dir dataset/amazon --domain books \
        --init_checkpoint pretrained_ckpt/bert-base-uncased \
        --output_dir runs/train_multi_domain/amazon/seed42 --do_train --do_test
Four GPUs:  torchrun --standalone --nproc_per_node 4 train_multi_domain.py ... --batch_size 8

--pooled trains one head on the pooled domains (the "mix" baseline: the same batches, one
classifier for all); --init_layers with a student's blocks trains the student's architecture
on the labels alone (the multi-domain no-distillation baseline: finetune_multi_domain.sh with
DISTILL=0).
"""
import sys

import stages
from distillation import DomainRelationalGraph
from objectives import build_teacher, make_multi_domain_ce


def build_parser():
    parser = stages.stage_parser(__doc__, lr=5e-5, epochs=3, batch_size=32, multi_domain=True)
    model = stages.add_teacher_args(parser)
    model.add_argument("--use_graph", action="store_true",
                       help="weight each domain's cross-entropy by a domain-relational graph "
                            "over the per-domain mean of all hidden states")
    model.add_argument("--train_graph", action="store_true",
                       help="optimise the graph too (off = released behaviour)")
    model.add_argument("--pooled", action="store_true",
                       help="one head for all domains (the mix baseline: a model of the pooled "
                            "domains), not one head per domain")
    return parser


def run(args):
    context = stages.begin_stage(args, stages.teacher_vocab, multi_domain=True)
    if args.do_train:
        model = build_teacher(args.model_config, args.init_checkpoint, len(context.tokenizer),
                              len(context.labels), args.max_seq_length,
                              num_domains=None if args.pooled else len(context.domains),
                              blocks=args.init_layers)
        extra, graph = {}, None
        if args.use_graph:
            graph = DomainRelationalGraph(1, len(context.domains), model.config.hidden_size,
                                          hierarchical=False).to(context.dist.device)
            graph.requires_grad_(args.train_graph)
            extra["graph"] = graph
        stages.train_stage(context, model, make_multi_domain_ce(graph), "train_multi_domain",
                           extra_modules=extra)
    stages.finish_stage(context)


def main(argv=None) -> int:
    return stages.stage_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
