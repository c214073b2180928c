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
import os
import sys

import stages
from modeling import find_weights_file, model_from_checkpoint
from objectives import (DistillConfig, build_student, check_teacher_labels, freeze,
                        make_kd_loss)
from teacher_cache import TeacherTargets


def build_parser():
    parser = stages.stage_parser(__doc__, lr=5e-5, epochs=10, batch_size=32)
    stages.add_student_args(parser)
    return parser


def run(args):
    context = stages.begin_stage(args, stages.student_vocab, multi_domain=False)
    if args.do_train:
        teacher_file = find_weights_file(args.teacher_dir)
        teacher = freeze(model_from_checkpoint(teacher_file), args.amp).to(context.dist.device)
        check_teacher_labels(teacher, context.labels, teacher_file)
        student = build_student(args.student_config, args.student_init, args.student_init_layers,
                                len(context.tokenizer), len(context.labels), teacher.config,
                                args.max_seq_length)
        targets = TeacherTargets()  # filled once the run directory is open
        layers = student.config.num_hidden_layers
        stages.train_stage(
            context, student, make_kd_loss(teacher, DistillConfig.from_args(args), targets),
            "finetune_domain", {"teacher": os.path.abspath(teacher_file)},
            prepare=lambda: stages.fill_teacher_targets(context, targets, [teacher], [[0]],
                                                        layers))
    stages.finish_stage(context)


def main(argv=None) -> int:
    return stages.stage_main(build_parser, run, argv, per_domain=True)


if __name__ == "__main__":
    sys.exit(main())
