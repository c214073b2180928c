#!/usr/bin/env bash
# The embedded default: the experiment stages on generated data with tiny models, on the CPU.
# It runs the real launchers (*.sh) with small settings, then prints the paper-layout table.
#   bash demo.sh            (make demo sets up .venv first)
# Everything lands in demo_runs/ (the sample in demo_runs/sample).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHON=${PYTHON:-python}

DEMO_ROOT=${DEMO_ROOT:-demo_runs}
SAMPLE=${DEMO_ROOT}/sample
rm -rf "${DEMO_ROOT}"
${PYTHON} data_processing.py --out "${SAMPLE}" --size small > /dev/null

# Tiny models, random initialisation, the generated vocabulary; demo-sized optimisation.
export OUT_ROOT=${DEMO_ROOT}
export TASKS=amazon
export AMAZON_DIR=${SAMPLE}/amazon MNLI_DIR=${SAMPLE}/MNLI
export VOCAB_FILE=${SAMPLE}/vocab.txt
export TEACHER_CONFIG=tiny_teacher TEACHER_INIT=""
export STUDENT_CONFIG=tiny_student STUDENT_INIT=""
export MAX_SEQ_LENGTH=64 VAL_FREQ=26 EXTRA_ARGS="--no_progress"
export NUM_GPU=1 SEEDS=42

start=$(date +%s)
echo "== stage 1: single-domain teachers"
LR=1e-3 EPOCHS=10 bash train_domain.sh 2> "${DEMO_ROOT}/stage1.log"
echo "== stage 2: TinyBERT-KD students"
LR=1e-3 EPOCHS=10 bash finetune_domain.sh 2> "${DEMO_ROOT}/stage2.log"
echo "== report ($(( $(date +%s) - start )) s of training)"
${PYTHON} report.py --runs "${DEMO_ROOT}" --out "${DEMO_ROOT}/report"
