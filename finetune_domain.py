"""Stage 2: TinyBERT-KD, distil one domain's teacher into a small student (no hard labels).

loss = hidden_ratio * (MSE(emb) + sum_i [MSE(att) + MSE(hidden)]) + pred_ratio * SCE(logits)
with student block i learning from teacher block i * L_t / L_s (REFERENCE.md section 4).

Reads  --teacher_dir (the stage-1 run directory, or a checkpoint file), --student_init (e.g.
       pretrained_ckpt/tinybert-4l-312: the general TinyBERT; optional), the data.
Writes --output_dir: as train_domain.py (best_model.bin is the student).

Single process (effective batch 32):
    python finetune_domain.py --task amazon --data_dir dataset/amazon --domain books \
        --teacher_dir runs/teacher/amazon_books --student_init pretrained_ckpt/tinybert-4l-312 \
        --output_dir runs/tinybert_kd/amazon_books --do_train --do_test
Four GPUs:  torchrun --standalone --nproc_per_node 4 finetune_domain.py ... --batch_size 8
The launcher finetune_domain.sh loops over every domain of both data sets.
"""
import argparse
import os
import sys

import utils
from distillation import frozen_teacher_outputs, tinybert_kd_loss
from modeling import (BertClassifier, config_source, find_weights_file, load_weights,
                      model_from_checkpoint, resolve_config)


def add_student_args(parser: argparse.ArgumentParser):
    """Student and distillation flags shared by stages 2 and 4."""
    group = parser.add_argument_group("student and distillation")
    group.add_argument("--teacher_dir", required=True,
                       help="the teacher's run directory (or a checkpoint file)")
    group.add_argument("--student_config", default=None,
                       help="a preset name or a config.json (file or folder); default: the "
                            "--student_init folder's config.json, else tinybert_4l_312")
    group.add_argument("--student_init", default=None,
                       help="general TinyBERT weights (folder or file, or all-MiniLM-L6-v2); "
                            "none: random init")
    group.add_argument("--student_init_layers", type=int, nargs="+", default=None,
                       metavar="BLOCK",
                       help="initialise the student's blocks from these encoder blocks of "
                            "--student_init (numbered from 1), e.g. 1 2; without "
                            "--student_config the student then has that many layers")
    group.add_argument("--hidden_ratio", type=float, default=1.0)
    group.add_argument("--pred_ratio", type=float, default=1.0)
    group.add_argument("--temperature", type=float, default=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(parser, lr=5e-5, epochs=10, batch_size=32)
    add_student_args(parser)
    return parser


def student_vocab(args) -> str:
    """--vocab_file, else the student's initial checkpoint's, else the teacher run's."""
    if args.vocab_file or args.student_init:
        return utils.default_vocab(args, args.student_init)
    teacher = args.teacher_dir
    if not os.path.isdir(teacher):
        teacher = os.path.dirname(teacher)
    return os.path.join(teacher, "vocab.txt")


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


def build_student(args, vocab_size: int, num_labels: int, teacher_config,
                  num_domains=None) -> BertClassifier:
    """The student, checked against the teacher before anything is read or written."""
    blocks = args.student_init_layers
    config = resolve_config(config_source(args.student_config, args.student_init,
                                          "tinybert_4l_312"), vocab_size)
    if blocks and not args.student_config:
        config.num_hidden_layers = len(blocks)
    check_layer_ratio(config.num_hidden_layers, teacher_config.num_hidden_layers, blocks)
    utils.check_sequence_length(teacher_config, args.max_seq_length, "teacher")
    utils.check_sequence_length(config, args.max_seq_length, "student")
    teacher_width = teacher_config.hidden_size
    student = BertClassifier(config, num_labels, num_domains=num_domains, fit_size=teacher_width)
    if args.student_init:
        load_weights(student, args.student_init, blocks=blocks)
    return student


def make_kd_loss(teacher, args):
    """The stage-2 objective as the loop's compute_loss."""

    def compute_loss(student, batches):
        batch = batches[0]
        inputs = (batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
        student_layers = utils.unwrap(student).config.num_hidden_layers
        teacher_out = frozen_teacher_outputs(teacher, *inputs, None, student_layers)
        student_out = student(*inputs)
        return tinybert_kd_loss(student_out, teacher_out, args.hidden_ratio, args.pred_ratio,
                                args.temperature)

    return compute_loss


def run(args):
    context = utils.begin_stage(args, student_vocab, multi_domain=False)
    if args.do_train:
        teacher_file = find_weights_file(args.teacher_dir)
        teacher = utils.freeze(model_from_checkpoint(teacher_file), args.amp)
        teacher = teacher.to(context.dist.device)
        student = build_student(args, len(context.tokenizer), len(context.labels),
                                teacher.config)
        utils.train_stage(context, student, make_kd_loss(teacher, args), "finetune_domain",
                          {"teacher": os.path.abspath(teacher_file)})
    utils.finish_stage(context)


def main(argv=None) -> int:
    return utils.stage_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
