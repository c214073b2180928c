#!/usr/bin/env bash
# Meta-KD stage B: distil each data set's meta-teacher into one small student per domain (B1,
# the intermediate layers weighted by (1 + t_i) lambda_i, then B2, the prediction layer at
# T = 2: METAKD.md section 3), then test each with its best dev checkpoint.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash finetune_metakd.sh
# Teachers: $OUT_ROOT/train_meta_teacher/<task>/seed<seed> (train_meta_teacher.sh); runs land
# in $OUT_ROOT/finetune_metakd/<task>/<domain>/seed<seed>, B1 in its intermediate/ sub-folder
# (shared settings: launch_common.sh).
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-B hyper-parameters (the code's: METAKD.md section 3) -----------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # 16 per GPU x 2 GPUs in the code; kept whatever NUM_GPU is
LR=${LR:-3e-5}
EPOCHS=${EPOCHS:-10}                  # B2, the prediction layer
INTERMEDIATE_EPOCHS=${INTERMEDIATE_EPOCHS:-10}   # B1, the intermediate layers
STUDENT_CONFIG=${STUDENT_CONFIG-tinybert_4l_312}  # empty: STUDENT_INIT's config.json
STUDENT_INIT=${STUDENT_INIT-pretrained_ckpt/tinybert-4l-312}    # empty: random init
STUDENT_INIT_LAYERS=${STUDENT_INIT_LAYERS-}   # e.g. "1 2": only these blocks of STUDENT_INIT
DOMAIN_LOSS_WEIGHT=${DOMAIN_LOSS_WEIGHT:-0.5} # gamma of the domain-feature MSE
TEMPERATURE=${TEMPERATURE:-2}
METAKD_ARGS=${METAKD_ARGS:-}          # e.g. "--weights_on_batch_mean" (the code's B1)

# ---- few-shot section: MODE=fewshot (or both) repeats the stage on p% of the training data ---
MODE=${MODE:-full}                                  # full | fewshot | both
FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-"1 2 5 10 20"}
# ---------------------------------------------------------------------------------------------

BATCH=$(per_process_batch "${TOTAL_BATCH}")
run_stage() {  # every domain of a task in one process (one start-up, one torch import)
  local root=$1 ratio=$2 phase=()
  # FEWSHOT_STEPS / MAX_STEPS: B1 as long as B2
  if [ -n "${STEPS:-}" ]; then phase=(--intermediate_max_steps "${STEPS}"); fi
  for TASK in ${TASKS}; do
    for SEED in ${SEEDS}; do
      set_common "${ratio}" "${SEED}"
      set_student_checkpoint
      # shellcheck disable=SC2046,SC2086
      "${LAUNCH[@]}" finetune_metakd.py --task "${TASK}" --data_dir "$(data_dir_of "${TASK}")" \
        --domain $(domains_of "${TASK}") \
        --teacher_dir "${root}/train_meta_teacher/${TASK}/seed$(teacher_seed "${SEED}")" \
        ${STUDENT[@]+"${STUDENT[@]}"} --intermediate_epochs "${INTERMEDIATE_EPOCHS}" \
        ${phase[@]+"${phase[@]}"} --domain_loss_weight "${DOMAIN_LOSS_WEIGHT}" \
        --temperature "${TEMPERATURE}" ${METAKD_ARGS} "${COMMON[@]}" \
        --output_dir "${root}/finetune_metakd/${TASK}/{domain}/seed${SEED}"
    done
  done
}
run_modes
