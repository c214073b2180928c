#!/usr/bin/env bash
# Stage 4: HRKD and its ablations, distilling each data set's stage-3 teacher, then test.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash finetune_multi_domain.sh
# Teachers: $OUT_ROOT/train_multi_domain/<task>/seed<seed> (best_model_<domain>.bin); runs land
# in $OUT_ROOT/finetune_multi_domain/<task>/<variant>/seed<seed> (shared: launch_common.sh).
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-4 hyper-parameters (paper: REFERENCE.md section 1) -------------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # per domain per step: 8 per GPU x 4 GPUs
LR=${LR:-5e-5}
EPOCHS=${EPOCHS:-10}
STUDENT_CONFIG=${STUDENT_CONFIG-tinybert_4l_312}  # empty: STUDENT_INIT's config.json
STUDENT_INIT=${STUDENT_INIT-pretrained_ckpt/tinybert-4l-312}    # empty: random init
STUDENT_INIT_LAYERS=${STUDENT_INIT_LAYERS-}   # e.g. "1 2": only these blocks of STUDENT_INIT
HIDDEN_RATIO=${HIDDEN_RATIO:-1}
PRED_RATIO=${PRED_RATIO:-1}
TEMPERATURE=${TEMPERATURE:-1}
GRAPH_DROPOUT=${GRAPH_DROPOUT:-0.1}
META_ARGS=${META_ARGS:-"--meta_lr 1e-3 --meta_every 1"}   # used by the meta variants
# Variants (variants.py lists them): hrkd (the paper's method), no_hierarchy and no_graph (its
# ablations), and the weighting studies: uniform (w = 1/D), meta (graph learned by a
# meta-objective on the unweighted distillation loss), meta_gold (the same on the gold labels),
# trained_graph (--train_graph).
VARIANTS=${VARIANTS-"hrkd no_hierarchy no_graph"}

# ---- few-shot section: MODE=fewshot (or both) repeats the stage on p% of the training data ---
MODE=${MODE:-full}                                  # full | fewshot | both
FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-"1 2 5 10 20"}
# ---------------------------------------------------------------------------------------------

variant_args() {  # the variant's flags, from variants.py (the one list of stage-4 runs)
  "$(fact_python)" variants.py args "$1"
}

for VARIANT in ${VARIANTS}; do variant_args "${VARIANT}" > /dev/null; done  # unknown: stop now
BATCH=$(per_process_batch "${TOTAL_BATCH}")
run_stage() {
  local root=$1 ratio=$2
  for TASK in ${TASKS}; do
    for VARIANT in ${VARIANTS}; do
      for SEED in ${SEEDS}; do
        local out="${root}/finetune_multi_domain/${TASK}/${VARIANT}/seed${SEED}"
        if [ "${SKIP_FINISHED}" = 1 ] && run_finished "${out}"; then
          echo "skipped (finished): ${out}" >&2
          continue
        fi
        set_student; set_common "${ratio}" "${SEED}"
        # the fit domain is the task's own (finetune_multi_domain.py knows it)
        # shellcheck disable=SC2046,SC2086
        "${LAUNCH[@]}" finetune_multi_domain.py --task "${TASK}" \
          --data_dir "$(data_dir_of "${TASK}")" \
          --teacher_dir "${root}/train_multi_domain/${TASK}/seed$(teacher_seed "${SEED}")" \
          "${STUDENT[@]}" --graph_dropout "${GRAPH_DROPOUT}" $(variant_args "${VARIANT}") \
          ${META_ARGS} "${COMMON[@]}" --output_dir "${out}"
      done
    done
  done
}
run_modes
