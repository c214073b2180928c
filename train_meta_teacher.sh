#!/usr/bin/env bash
# Meta-KD stage A: the meta-teacher of each data set (one head over the pooled domains, the
# prototype instance weights, the corrupted-domain loss: METAKD.md section 2), then test.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash train_meta_teacher.sh
# Runs land in $OUT_ROOT/train_meta_teacher/<task>/seed<seed> (shared settings:
# launch_common.sh); finetune_metakd.sh distils them.
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-A hyper-parameters (the multi-domain teacher's: same model, same batches) --------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # per domain per step: 8 per GPU x 4 GPUs
LR=${LR:-5e-5}
EPOCHS=${EPOCHS:-3}
TEACHER_CONFIG=${TEACHER_CONFIG-bert_base}  # empty: TEACHER_INIT's config.json
TEACHER_INIT=${TEACHER_INIT-pretrained_ckpt/bert-base-uncased}   # empty: random init; also
                                      # the untuned encoder of the prototype weights t_i
DOMAIN_LOSS_WEIGHT=${DOMAIN_LOSS_WEIGHT:-0.5}   # alpha of the corrupted-domain loss (the code's)

# ---- few-shot section: MODE=fewshot (or both) repeats the stage on p% of the training data ---
MODE=${MODE:-full}                                  # full | fewshot | both
FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-"1 2 5 10 20"}
# ---------------------------------------------------------------------------------------------

BATCH=$(per_process_batch "${TOTAL_BATCH}")
run_stage() {
  local root=$1 ratio=$2
  for TASK in ${TASKS}; do
    for SEED in ${SEEDS}; do
      set_teacher; set_common "${ratio}" "${SEED}"
      "${LAUNCH[@]}" train_meta_teacher.py --task "${TASK}" \
        --data_dir "$(data_dir_of "${TASK}")" "${TEACHER[@]}" \
        --domain_loss_weight "${DOMAIN_LOSS_WEIGHT}" "${COMMON[@]}" \
        --output_dir "${root}/train_meta_teacher/${TASK}/seed${SEED}"
    done
  done
}
run_modes
