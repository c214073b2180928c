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
from data_processing import get_processor
from modeling import BertClassifier, load_weights, model_from_checkpoint, resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    utils.add_common_args(parser, lr=2e-5, epochs=3, batch_size=32)
    model = parser.add_argument_group("model")
    model.add_argument("--model_config", default="bert_base",
                       help="a preset name or a config.json (file or folder)")
    model.add_argument("--init_checkpoint", default=None,
                       help="pretrained weights (folder or file); none: random initialisation")
    return parser


def cross_entropy_loss(model, batches):
    batch = batches[0]
    logits = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                   score_layers=()).logits
    return {"loss": F.cross_entropy(logits.float(), batch["labels"])}


def run(args):
    utils.validate_common_args(args)
    dist = utils.Distributed()
    utils.setup_logging(main=dist.is_main)
    utils.set_seed(args.seed)
    processor = get_processor(args.task)
    vocab_file = utils.default_vocab(args, args.init_checkpoint)
    tokenizer, features = utils.load_features(args, [args.domain], vocab_file, dist)
    run_dir = utils.RunDir(args.output_dir, dist.is_main)
    head_of = {args.domain: None}
    if args.do_train:
        config = resolve_config(args.model_config, len(tokenizer))
        utils.check_sequence_length(config, args.max_seq_length, "model")
        model = BertClassifier(config, num_labels=len(processor.labels))
        if args.init_checkpoint:
            load_weights(model, args.init_checkpoint)
        run_dir.prepare_for_training(args, dist)
        utils.setup_logging(run_dir.file("train.log"), dist.is_main)
        utils.copy_vocab(vocab_file, run_dir)
        stage = utils.Stage(
            model=model, domains=[args.domain], fit_domain=args.domain,
            train_features=utils.split_of(features, "train"),
            dev_features=utils.split_of(features, "dev"), head_of=head_of,
            compute_loss=cross_entropy_loss,
            checkpoint_meta={"task": args.task, "domains": [args.domain],
                             "labels": processor.labels, "stage": "train_domain"})
        utils.train(args, stage, run_dir, dist)
    if args.do_test and dist.is_main:
        utils.run_test(args, run_dir, [args.domain], head_of, utils.split_of(features, "test"),
                       utils.split_of(features, "dev"), dist.device, model_from_checkpoint)
    dist.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return utils.main_guard(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
