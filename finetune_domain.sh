#!/usr/bin/env bash
# Stage 2: TinyBERT-KD, distil each domain's stage-1 teacher into a TinyBERT 4L-312, then test.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash finetune_domain.sh
# Teachers: $OUT_ROOT/train_domain/<task>/<domain>/seed<seed>; runs land in
# $OUT_ROOT/finetune_domain/<task>/<domain>/seed<seed> (shared settings: launch_common.sh).
# DISTILL=0 trains the same students on the labels alone (train_domain.py, no teacher): the
# no-distillation baseline, in $OUT_ROOT/labels_only_domain/<task>/<domain>/seed<seed>.
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-2 hyper-parameters (paper: REFERENCE.md section 1) -------------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # 8 per GPU x 4 GPUs; kept whatever NUM_GPU is
LR=${LR:-5e-5}
EPOCHS=${EPOCHS:-10}
STUDENT_CONFIG=${STUDENT_CONFIG-tinybert_4l_312}  # empty: STUDENT_INIT's config.json
STUDENT_INIT=${STUDENT_INIT-pretrained_ckpt/tinybert-4l-312}    # empty: random init
STUDENT_INIT_LAYERS=${STUDENT_INIT_LAYERS-}   # e.g. "1 2": only these blocks of STUDENT_INIT
HIDDEN_RATIO=${HIDDEN_RATIO:-1}
PRED_RATIO=${PRED_RATIO:-1}
TEMPERATURE=${TEMPERATURE:-1}
DISTILL=${DISTILL:-1}                 # 0: no teacher, the student on the labels alone

# ---- few-shot section: MODE=fewshot (or both) repeats the stage on p% of the training data ---
MODE=${MODE:-full}                                  # full | fewshot | both
FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-"1 2 5 10 20"}
# ---------------------------------------------------------------------------------------------

BATCH=$(per_process_batch "${TOTAL_BATCH}")
run_stage() {  # every domain of a task in one process (one start-up, one torch import)
  local root=$1 ratio=$2
  for TASK in ${TASKS}; do
    for SEED in ${SEEDS}; do
      set_common "${ratio}" "${SEED}"
      if [ "${DISTILL}" = 0 ]; then
        set_student_model
        # shellcheck disable=SC2046
        "${LAUNCH[@]}" train_domain.py --task "${TASK}" --data_dir "$(data_dir_of "${TASK}")" \
          --domain $(domains_of "${TASK}") "${STUDENT_MODEL[@]}" "${COMMON[@]}" \
          --output_dir "${root}/labels_only_domain/${TASK}/{domain}/seed${SEED}"
        continue
      fi
      set_student
      # shellcheck disable=SC2046
      "${LAUNCH[@]}" finetune_domain.py --task "${TASK}" --data_dir "$(data_dir_of "${TASK}")" \
        --domain $(domains_of "${TASK}") \
        --teacher_dir "${root}/train_domain/${TASK}/{domain}/seed$(teacher_seed "${SEED}")" \
        "${STUDENT[@]}" "${COMMON[@]}" \
        --output_dir "${root}/finetune_domain/${TASK}/{domain}/seed${SEED}"
    done
  done
}
run_modes
