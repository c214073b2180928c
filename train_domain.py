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
The launcher train_domain.sh loops over every domain of both data sets. With a student's
architecture (--init_layers, e.g. 1 2 of all-MiniLM-L6-v2) this is the no-distillation
baseline: the student trained on the labels alone (finetune_domain.sh with DISTILL=0).
"""
import sys

import stages
from objectives import build_teacher, cross_entropy_loss


def build_parser():
    parser = stages.stage_parser(__doc__, lr=2e-5, epochs=3, batch_size=32)
    stages.add_teacher_args(parser)
    return parser


def run(args):
    context = stages.begin_stage(args, stages.teacher_vocab, multi_domain=False)
    if args.do_train:
        model = build_teacher(args.model_config, args.init_checkpoint, len(context.tokenizer),
                              len(context.labels), args.max_seq_length,
                              blocks=args.init_layers)
        stages.train_stage(context, model, cross_entropy_loss, "train_domain")
    stages.finish_stage(context)


def main(argv=None) -> int:
    return stages.stage_main(build_parser, run, argv, per_domain=True)


if __name__ == "__main__":
    sys.exit(main())
