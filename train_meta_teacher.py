"""Meta-KD stage A: the meta-teacher, one BERT over the pooled domains (METAKD.md section 2).

First each training example's transferability t_i is computed from the untuned pretrained
encoder (--init_checkpoint as loaded, before any training): the cosine of its mean-pooled last
layer with its domain's prototype and with the other domains' prototype, averaged (A0; cached
beside the feature cache). Then one model with ONE sentiment head shared by all domains and a
domain branch trains on

    loss = (1/B) sum_i t_i * (CE(z_i, y_i) + alpha * CE(g_i, d_pi(i)))

where pi permutes the batch at random: the domain head learns the domain of another example,
so the encoder is pushed towards features that do not give the domain away (A1-A2). Batches
are those of the mix teacher (train_multi_domain.py --pooled): --batch_size examples of every
domain per step, so the two rows differ only by the Meta-KD terms.

Reads  --data_dir, --init_checkpoint (e.g. pretrained_ckpt/bert-base-uncased).
Writes --output_dir: as train_multi_domain.py (best_model.bin, the best mean dev accuracy, is
       the meta-teacher that finetune_metakd.py distils; its domain branch is stored in it as
       domain_branch_state_dict), plus instance_weights.pt (t_i of every training example).

    python train_meta_teacher.py --task amazon --data_dir dataset/amazon \
        --init_checkpoint pretrained_ckpt/bert-base-uncased \
        --output_dir runs/train_meta_teacher/amazon/seed42 --do_train --do_test
Four GPUs:  torchrun --standalone --nproc_per_node 4 train_meta_teacher.py ... --batch_size 8
The launcher train_meta_teacher.sh runs every task and seed.
"""
import sys

import stages
from metakd import (INSTANCE_WEIGHTS_FILE, DomainBranch, MetaKDConfig, instance_weights,
                    make_meta_teacher_loss)
from objectives import build_teacher
from utils import atomic_torch_save, default_cache_dir

# A domain prototype from a single example is that example: its own-domain cosine is 1.
MIN_DOMAIN_EXAMPLES = 2


def build_parser():
    parser = stages.stage_parser(__doc__, lr=5e-5, epochs=3, batch_size=32, multi_domain=True)
    stages.add_teacher_args(parser)
    group = parser.add_argument_group("Meta-KD (METAKD.md section 2)")
    group.add_argument("--domain_loss_weight", type=float, default=0.5,
                       help="alpha: weight of the corrupted-domain cross-entropy")
    stages.add_switch(group, "sample_weights", True,
                      "weight each example's loss by its prototype score t_i")
    return parser


def validate_args(args):
    if args.domain_loss_weight < 0:
        raise ValueError(f"--domain_loss_weight must not be negative, got "
                         f"{args.domain_loss_weight}")


def check_domain_sizes(train, data_dir: str):
    for domain, features in train.items():
        count = features["labels"].shape[0]
        if count < MIN_DOMAIN_EXAMPLES:
            raise ValueError(f"{data_dir}: domain '{domain}' has {count} training example(s); "
                             f"Meta-KD's domain prototypes need at least {MIN_DOMAIN_EXAMPLES}")


def run(args):
    validate_args(args)
    context = stages.begin_stage(args, stages.teacher_vocab, multi_domain=True)
    if args.do_train:
        model = build_teacher(args.model_config, args.init_checkpoint, len(context.tokenizer),
                              len(context.labels), args.max_seq_length, num_domains=None,
                              blocks=args.init_layers)
        device = context.dist.device
        train = stages.split_of(context.features, "train")
        check_domain_sizes(train, args.data_dir)
        # t_i from the encoder as loaded, before any training (also on --resume: the model is
        # rebuilt from --init_checkpoint first, and the cache answers)
        weights = instance_weights(model.to(device), train,
                                   args.cache_dir or default_cache_dir(), args.eval_batch_size,
                                   device, context.dist.is_main)
        config = MetaKDConfig(domain_loss_weight=args.domain_loss_weight,
                              sample_weights=args.sample_weights)
        branch = DomainBranch.of(model.config, len(context.domains)).to(device)

        def keep_weights():
            if context.dist.is_main:
                atomic_torch_save(weights, context.run_dir.file(INSTANCE_WEIGHTS_FILE))

        per_domain = [weights["weights"][d] for d in context.domains]
        stages.train_stage(context, model, make_meta_teacher_loss(branch, per_domain, config),
                           "train_meta_teacher", {"metakd": "meta_teacher"},
                           prepare=keep_weights, extra_modules={"domain_branch": branch})
    stages.finish_stage(context)


def main(argv=None) -> int:
    return stages.stage_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
