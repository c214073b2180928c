#!/usr/bin/env bash
# Stage 4: HRKD and its ablations, distilling each data set's stage-3 teacher, then test.
# Edit the blocks below, or set any of these variables in the environment, then:
#   bash finetune_multi_domain.sh
# Teachers: $OUT_ROOT/train_multi_domain/<task>/seed<seed> (best_model_<domain>.bin); runs land
# in $OUT_ROOT/finetune_multi_domain/<task>/<variant>/seed<seed> (shared: launch_common.sh).
# DISTILL=0 trains the same student on the labels alone (train_multi_domain.py, a head per
# domain, no teacher): the no-distillation baseline, in
# $OUT_ROOT/labels_only_multi_domain/<task>/seed<seed>; VARIANTS is then not used.
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
DISTILL=${DISTILL:-1}                 # 0: no teacher, the student on the labels alone
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

for VARIANT in ${VARIANTS}; do  # an unknown variant stops here (variants.py: the one list)
  "$(fact_python)" variants.py args "${VARIANT}" > /dev/null
done
BATCH=$(per_process_batch "${TOTAL_BATCH}")
run_stage() {  # every variant of a task and seed in one process (one start-up, one torch import)
  local root=$1 ratio=$2
  for TASK in ${TASKS}; do
    for SEED in ${SEEDS}; do
      if [ "${DISTILL}" = 0 ]; then
        set_common "${ratio}" "${SEED}"; set_student_model
        "${LAUNCH[@]}" train_multi_domain.py --task "${TASK}" \
          --data_dir "$(data_dir_of "${TASK}")" "${STUDENT_MODEL[@]}" "${COMMON[@]}" \
          --output_dir "${root}/labels_only_multi_domain/${TASK}/seed${SEED}"
        continue
      fi
      local base="${root}/finetune_multi_domain/${TASK}" todo=() out
      for VARIANT in ${VARIANTS}; do
        if [ "${SKIP_FINISHED}" = 1 ] && run_finished "${base}/${VARIANT}/seed${SEED}"; then
          echo "skipped (finished): ${base}/${VARIANT}/seed${SEED}" >&2
        else
          todo+=("${VARIANT}")
        fi
      done
      if [ "${#todo[@]}" -eq 0 ]; then continue; fi
      out="${base}/{variant}/seed${SEED}"
      if [ "${#todo[@]}" -eq 1 ]; then out="${base}/${todo[0]}/seed${SEED}"; fi
      set_student; set_common "${ratio}" "${SEED}"
      # the fit domain is the task's own (finetune_multi_domain.py knows it); each variant's
      # flags come from variants.py
      # shellcheck disable=SC2086
      "${LAUNCH[@]}" finetune_multi_domain.py --task "${TASK}" \
        --data_dir "$(data_dir_of "${TASK}")" \
        --teacher_dir "${root}/train_multi_domain/${TASK}/seed$(teacher_seed "${SEED}")" \
        "${STUDENT[@]}" --graph_dropout "${GRAPH_DROPOUT}" --variant "${todo[@]}" \
        ${META_ARGS} "${COMMON[@]}" --output_dir "${out}"
    done
  done
}
run_modes
