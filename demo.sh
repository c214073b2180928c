#!/usr/bin/env bash
# The embedded default: all four stages (and HRKD's two ablations) on generated data in both
# real formats (MNLI-style TSVs, Amazon-style .review files), tiny models, CPU. It runs the real
# launchers (*.sh) with demo-sized settings, then prints the paper-layout table.
#   make demo              (sets up .venv, then runs this)
#   bash demo.sh --study   (not part of make demo: the graph-weighting study, see README)
# Everything lands in demo_runs/ (sample data in demo_runs/sample, tables in demo_runs/report).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHON=${PYTHON:-python}

STUDY=0
if [ "${1:-}" = "--study" ]; then STUDY=1; fi
DEMO_ROOT=${DEMO_ROOT:-demo_runs}
if [ "${STUDY}" = 1 ]; then DEMO_ROOT=${STUDY_ROOT:-demo_runs/study}; fi
SAMPLE=${DEMO_ROOT}/sample
rm -rf "${DEMO_ROOT}"
mkdir -p "${DEMO_ROOT}"
UNRELIABLE=${UNRELIABLE:-kitchen}
FLIP_PROB=${FLIP_PROB:-0.4}
${PYTHON} sample_corpus.py --out "${SAMPLE}" --size small > /dev/null

# Tiny models from random initialisation, the generated vocabulary, demo-sized optimisation.
export OUT_ROOT=${DEMO_ROOT}
export TASKS="amazon mnli"
export AMAZON_DIR=${SAMPLE}/amazon MNLI_DIR=${SAMPLE}/MNLI
export VOCAB_FILE=${SAMPLE}/vocab.txt
export TEACHER_CONFIG=tiny_teacher TEACHER_INIT=""
export STUDENT_CONFIG=tiny_student STUDENT_INIT=""
export MAX_SEQ_LENGTH=${DEMO_SEQ_LENGTH:-40} VAL_FREQ=${DEMO_VAL_FREQ:-40}
export EXTRA_ARGS="--no_progress" NUM_GPU=1 SEEDS=42 MODE=full
TEACHER_LR=1e-3 STUDENT_LR=3e-3    # tiny models from scratch learn fast at these rates
EPOCHS_SINGLE=${DEMO_EPOCHS_SINGLE:-6}
EPOCHS_MULTI_TEACHER=${DEMO_EPOCHS_MULTI_TEACHER:-10}
EPOCHS_MULTI_STUDENT=${DEMO_EPOCHS_MULTI_STUDENT:-6}

stage() {  # name, launcher, learning rate, epochs, per-domain total batch
  local name=$1 script=$2
  local begin
  begin=$(date +%s)
  LR=$3 EPOCHS=$4 TOTAL_BATCH=$5 bash "${script}" 2> "${DEMO_ROOT}/${script%.sh}.log"
  echo "  ${name}: $(( $(date +%s) - begin )) s (log: ${DEMO_ROOT}/${script%.sh}.log)"
}

start=$(date +%s)
if [ "${STUDY}" = 1 ]; then
  # One Amazon domain's training labels flipped with probability FLIP_PROB (dev and test stay
  # clean), as in reproduce_amazon.sh study: its teacher is unreliable.
  echo "== graph study: '${UNRELIABLE}' training labels flipped with p=${FLIP_PROB}; Amazon format"
  export TASKS=amazon GRAPH_DROPOUT=${GRAPH_DROPOUT:-0.1}
  export EXTRA_ARGS="${EXTRA_ARGS} --noisy_domain ${UNRELIABLE} --flip_prob ${FLIP_PROB}"
  stage "stage 3, multi-domain teacher" train_multi_domain.sh "${TEACHER_LR}" "${EPOCHS_MULTI_TEACHER}" 16
  VARIANTS="hrkd uniform meta_gold meta_scorer_gold" \
    META_ARGS="--meta_lr 5e-2 --meta_every 1 --meta_data dev" \
    stage "stage 4, graph / uniform / meta weightings" finetune_multi_domain.sh "${STUDENT_LR}" \
    "${EPOCHS_MULTI_STUDENT}" 16
  echo "== study: $(( $(date +%s) - start )) s"
  ${PYTHON} report.py --runs "${DEMO_ROOT}" --out "${DEMO_ROOT}/report" --tasks amazon \
    --study_domain "${UNRELIABLE}"
  echo "(a sensible weighting gives '${UNRELIABLE}' less than 1/D; plots in ${DEMO_ROOT}/report)"
  exit 0
fi
echo "== HRKD demo: generated MNLI-style and Amazon-style data, tiny models, CPU"
stage "stage 1, single-domain teachers" train_domain.sh "${TEACHER_LR}" "${EPOCHS_SINGLE}" 32
stage "stage 2, TinyBERT-KD students" finetune_domain.sh "${STUDENT_LR}" "${EPOCHS_SINGLE}" 32
stage "stage 3, multi-domain teachers" train_multi_domain.sh "${TEACHER_LR}" "${EPOCHS_MULTI_TEACHER}" 16
VARIANTS="hrkd no_hierarchy no_graph" \
  stage "stage 4, HRKD and ablations" finetune_multi_domain.sh "${STUDENT_LR}" "${EPOCHS_MULTI_STUDENT}" 16
echo "== all stages: $(( $(date +%s) - start )) s"
${PYTHON} report.py --runs "${DEMO_ROOT}" --out "${DEMO_ROOT}/report"
echo "(tables and plots written to ${DEMO_ROOT}/report)"
