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
"""
import argparse
import sys

import torch
import torch.nn.functional as F

import utils
from data_processing import concat_domain_batches
from distillation import DomainRelationalGraph
from train_domain import add_teacher_args, build_teacher


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(parser, lr=5e-5, epochs=3, batch_size=32)
    model = add_teacher_args(parser)
    model.add_argument("--use_graph", action="store_true",
                       help="weight each domain's cross-entropy by a domain-relational graph "
                            "over the per-domain mean of all hidden states")
    model.add_argument("--train_graph", action="store_true",
                       help="optimise the graph too (off = released behaviour)")
    return parser


def make_multi_domain_ce(graph=None):
    """Sum over domains of cross-entropy, each with its own head; one forward for all domains."""

    def compute_loss(model, batches):
        batch, domain_ids, sizes = concat_domain_batches(batches)
        out = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                    domain=domain_ids, score_layers=())
        per_example = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
        per_domain = torch.stack([chunk.mean() for chunk in torch.split(per_example, sizes)])
        losses = {f"ce_{d}": value.detach() for d, value in enumerate(per_domain)}
        if graph is None:
            return {"loss": per_domain.sum(), **losses}
        # One level over the per-domain mean of every reported hidden state.
        stacked = torch.stack([h.float() for h in out.hidden_states])       # (L+1, N, T, H)
        means = torch.stack([chunk.mean(dim=(0, 1, 2))
                             for chunk in torch.split(stacked, sizes, dim=1)])  # (D, H)
        weights, _ = graph(means[None])
        return {"loss": (weights[0] * per_domain).sum(), **losses}

    return compute_loss


def run(args):
    context = utils.begin_stage(args, lambda a: utils.default_vocab(a, a.init_checkpoint),
                                multi_domain=True)
    if args.do_train:
        model = build_teacher(args, len(context.tokenizer), len(context.labels),
                              num_domains=len(context.domains))
        extra, graph = {}, None
        if args.use_graph:
            graph = DomainRelationalGraph(1, len(context.domains), model.config.hidden_size,
                                          hierarchical=False).to(context.dist.device)
            graph.requires_grad_(args.train_graph)
            extra["graph"] = graph
        utils.train_stage(context, model, make_multi_domain_ce(graph), "train_multi_domain",
                          extra_modules=extra)
    utils.finish_stage(context)


def main(argv=None) -> int:
    return utils.stage_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
