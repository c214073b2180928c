#!/usr/bin/env bash
# Stage 3: one BERT-base teacher over all domains of each data set (a head per domain), then test.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash train_multi_domain.sh
# Runs land in $OUT_ROOT/train_multi_domain/<task>/seed<seed> (shared settings: launch_common.sh).
# POOLED=1 trains one head on the pooled domains instead (the mix baseline), in
# $OUT_ROOT/train_pooled/<task>/seed<seed>.
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-3 hyper-parameters (paper: REFERENCE.md section 1) -------------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # per domain per step: 8 per GPU x 4 GPUs
LR=${LR:-5e-5}
EPOCHS=${EPOCHS:-3}
TEACHER_CONFIG=${TEACHER_CONFIG-bert_base}  # empty: TEACHER_INIT's config.json
TEACHER_INIT=${TEACHER_INIT-pretrained_ckpt/bert-base-uncased}   # empty: random init
GRAPH_ARGS=${GRAPH_ARGS:-}            # "--use_graph" weights domains by a graph (off in paper)
POOLED=${POOLED:-0}                   # 1: one head for the pooled domains (the mix baseline)

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
      local name=train_multi_domain pooled=()
      if [ "${POOLED}" = 1 ]; then name=train_pooled; pooled=(--pooled); fi
      # the fit domain is the task's own (train_multi_domain.py knows it)
      # shellcheck disable=SC2086
      "${LAUNCH[@]}" train_multi_domain.py --task "${TASK}" \
        --data_dir "$(data_dir_of "${TASK}")" "${TEACHER[@]}" ${pooled[@]+"${pooled[@]}"} \
        ${GRAPH_ARGS} "${COMMON[@]}" --output_dir "${root}/${name}/${TASK}/seed${SEED}"
    done
  done
}
run_modes
