"""Meta-KD stage B: distil the meta-teacher into one small student per target domain.

Two phases, in order, as the code's distill_stage first / second (METAKD.md section 3):

B1, intermediate layers (--intermediate_epochs), in <output_dir>/intermediate:
    loss = mean_i w_i (MSE_i(hidden) + MSE_i(attention probabilities) + gamma MSE_i(domain))
    w_i = (1 + t_i) * sigmoid(-(1 - p^t_i(y_i))^2)
  with t_i the example's prototype score (the meta-teacher's instance_weights.pt), p^t the
  frozen meta-teacher's probabilities, gamma = --domain_loss_weight, and the domain feature
  W_u (E[d] + mean of the last hidden states) of teacher and student (the student's through
  its last fit map). --weights_on_batch_mean: the code's form, the batch-mean loss times the
  mean weight.
B2, prediction layer (--num_train_epochs), in <output_dir>, from B1's final student:
    loss = mean_i sum_c -softmax(z^t_i / T) log softmax(z^s_i / T),  T = --temperature (2)
  evaluated on the target domain's dev set; the test uses its best dev checkpoint.

Reads  --teacher_dir (a train_meta_teacher.py run: best_model.bin, instance_weights.pt),
       --student_init (the general TinyBERT; optional), the data.
Writes --output_dir: as finetune_domain.py (best_model.bin is the student), with B1's run in
       its sub-folder intermediate/ (its final state, last_checkpoint.pt, starts B2).

    python finetune_metakd.py --task amazon --data_dir dataset/amazon --domain books \
        --teacher_dir runs/train_meta_teacher/amazon/seed42 \
        --student_init pretrained_ckpt/tinybert-4l-312 \
        --output_dir runs/finetune_metakd/amazon/books/seed42 --do_train --do_test
Four GPUs:  torchrun --standalone --nproc_per_node 4 finetune_metakd.py ... --batch_size 8
The launcher finetune_metakd.sh runs every domain of every task.
"""
import dataclasses
import os
import sys

import stages
from metakd import (INTERMEDIATE_DIR, DomainBranch, MetaKDConfig, intermediate_args,
                    intermediate_finished, load_meta_teacher, make_intermediate_loss,
                    make_prediction_loss, read_instance_weights)
from modeling import safe_torch_load
from objectives import build_student, check_teacher_labels
from teacher_cache import TeacherTargets
from utils import RunDir, logger


def build_parser():
    parser = stages.stage_parser(__doc__, lr=5e-5, epochs=10, batch_size=32)
    stages.add_student_args(parser, ratios=False)
    group = parser.add_argument_group("Meta-KD (METAKD.md section 3)")
    group.add_argument("--intermediate_epochs", type=float, default=10.0,
                       help="epochs of B1, the intermediate-layer phase (--num_train_epochs "
                            "are B2's, the prediction-layer phase)")
    group.add_argument("--intermediate_max_steps", type=int, default=0,
                       help="B1 stops after this many steps (0: --intermediate_epochs decide)")
    group.add_argument("--domain_loss_weight", type=float, default=0.5,
                       help="gamma: weight of the domain-feature MSE in B1")
    group.add_argument("--temperature", type=float, default=2.0,
                       help="T of B2's soft cross-entropy (no T^2 factor, as the code)")
    group.add_argument("--weights_on_batch_mean", action="store_true",
                       help="the code's B1: (1 + t_i) lambda_i only rescale the batch-mean loss "
                            "(default: each example's loss is weighted)")
    return parser


def validate_args(args):
    if args.intermediate_epochs <= 0 and args.intermediate_max_steps <= 0:
        raise ValueError("--intermediate_epochs or --intermediate_max_steps must be positive")
    if args.domain_loss_weight < 0 or args.temperature <= 0:
        raise ValueError("--domain_loss_weight must not be negative and --temperature must be "
                         "positive")


def run(args):
    validate_args(args)
    context = stages.begin_stage(args, stages.student_vocab, multi_domain=False)
    context.run_dir.nested = (INTERMEDIATE_DIR,)
    if args.do_train:
        device = context.dist.device
        teacher, teacher_branch, domains, teacher_file = load_meta_teacher(
            args.teacher_dir, device, args.amp)
        if args.domain not in domains:
            raise ValueError(f"{teacher_file}: the meta-teacher knows domains "
                             f"{', '.join(domains)}, not '{args.domain}'")
        check_teacher_labels(teacher, context.labels, teacher_file)
        train = stages.split_of(context.features, "train")[args.domain]
        weights = read_instance_weights(args.teacher_dir, args.domain, train)
        student = build_student(args.student_config, args.student_init, args.student_init_layers,
                                len(context.tokenizer), len(context.labels), teacher.config,
                                args.max_seq_length)
        student_branch = DomainBranch.of(student.config, len(domains)).to(device)
        config = MetaKDConfig(domain_loss_weight=args.domain_loss_weight,
                              temperature=args.temperature,
                              on_batch_mean=args.weights_on_batch_mean)
        targets = TeacherTargets()  # filled once a run directory is open
        layers = student.config.num_hidden_layers
        fill = lambda: stages.fill_teacher_targets(context, targets, [teacher], [[0]],  # noqa
                                                   layers)
        meta = {"teacher": os.path.abspath(teacher_file), "metakd": "student"}
        phase, since = intermediate_args(args), None
        if not intermediate_finished(args):
            if phase.resume:  # B2's folder, which skip_or_resume checks, has no config yet
                stages.refuse_changed_recipe(RunDir(phase.output_dir), phase, resumable=True)
            b1 = dataclasses.replace(context, args=phase, run_dir=RunDir(
                phase.output_dir, context.dist.is_main), trained=None)
            logger.info("Meta-KD B1 (intermediate layers); its dev accuracy is that of an "
                        "untrained classifier")
            trained = stages.train_stage(
                b1, student, make_intermediate_loss(teacher, teacher_branch, student_branch,
                                                    weights, domains.index(args.domain),
                                                    config, targets),
                "finetune_metakd_intermediate", meta, prepare=fill,
                extra_modules={"domain_branch": student_branch})
            b1.run_dir.mark_finished(trained.global_step, tested=False)
            b1.run_dir.release_lock()
            since = (b1.run_dir.training_since, b1.run_dir.resumed)
            args.resume = False  # B2 starts now, from B1's final student
        else:  # B2 continues only where it has a resume state; else it starts from B1
            logger.info("Meta-KD B1 finished: %s", phase.output_dir)
            args.resume = os.path.isfile(context.run_dir.file(RunDir.LAST)) and (
                args.resume or args.skip_finished)
        final = safe_torch_load(os.path.join(phase.output_dir, RunDir.LAST))
        student.load_state_dict(final["model"])
        logger.info("Meta-KD B2 (prediction layer) from B1's final student")

        def prepare():
            # timing.json of the student times both phases: from B1's start when this process
            # trained it, else it timed a part only (as a resumed run)
            run = context.run_dir
            run.training_since, run.resumed = since or (run.training_since, True)
            fill()

        stages.train_stage(context, student, make_prediction_loss(teacher, config, targets),
                           "finetune_metakd", meta, prepare=prepare)
    stages.finish_stage(context)


def main(argv=None) -> int:
    return stages.stage_main(build_parser, run, argv, per_domain=True,
                             templated=("output_dir",))


if __name__ == "__main__":
    sys.exit(main())
