#!/usr/bin/env bash
# Stage 1: fine-tune one BERT-base teacher per domain (MNLI genres and Amazon domains), then test.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash train_domain.sh
# Runs land in $OUT_ROOT/train_domain/<task>/<domain>/seed<seed> (shared settings such as
# NUM_GPU, SEEDS, TASKS, AMP, data folders: launch_common.sh).
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-1 hyper-parameters (paper: REFERENCE.md section 1) -------------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # 8 per GPU x 4 GPUs; kept whatever NUM_GPU is
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-3}
TEACHER_CONFIG=${TEACHER_CONFIG-bert_base}  # empty: TEACHER_INIT's config.json
TEACHER_INIT=${TEACHER_INIT-pretrained_ckpt/bert-base-uncased}   # empty: random init

# ---- few-shot section: MODE=fewshot (or both) repeats the stage on p% of the training data ---
MODE=${MODE:-full}                                  # full | fewshot | both
FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-"1 2 5 10 20"}
# ---------------------------------------------------------------------------------------------

BATCH=$(per_process_batch "${TOTAL_BATCH}")
run_stage() {  # every domain of a task in one process (one start-up, one torch import)
  local root=$1 ratio=$2
  for TASK in ${TASKS}; do
    for SEED in ${SEEDS}; do
      set_teacher; set_common "${ratio}" "${SEED}"
      # shellcheck disable=SC2046
      "${LAUNCH[@]}" train_domain.py --task "${TASK}" --data_dir "$(data_dir_of "${TASK}")" \
        --domain $(domains_of "${TASK}") "${TEACHER[@]}" "${COMMON[@]}" \
        --output_dir "${root}/train_domain/${TASK}/{domain}/seed${SEED}"
    done
  done
}
run_modes
