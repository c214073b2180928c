#!/usr/bin/env bash
# Stage 1: fine-tune one BERT-base teacher per domain (MNLI genres and Amazon domains), then test.
# Edit the block below, or set any of these variables in the environment, then:
#   bash train_domain.sh
# Runs land in $OUT_ROOT/train_domain/<task>/<domain>/seed<seed>.
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-1 hyper-parameters (paper: REFERENCE.md section 1) -------------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # 8 per GPU x 4 GPUs; kept whatever NUM_GPU is
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-3}
TEACHER_CONFIG=${TEACHER_CONFIG:-bert_base}
TEACHER_INIT=${TEACHER_INIT-pretrained_ckpt/bert-base-uncased}   # empty: random init
TRAIN_RATIO=${TRAIN_RATIO:-0.9}
STAGE_ROOT=${STAGE_ROOT:-${OUT_ROOT}/train_domain}
# ---------------------------------------------------------------------------------------------

BATCH=$(per_process_batch "${TOTAL_BATCH}")
for TASK in ${TASKS}; do
  for DOMAIN in $(domains_of "${TASK}"); do
    for SEED in ${SEEDS}; do
      OUT="${STAGE_ROOT}/${TASK}/${DOMAIN}/seed${SEED}"
      ARGS="--task ${TASK} --data_dir $(data_dir_of "${TASK}") --domain ${DOMAIN}
            --model_config ${TEACHER_CONFIG} $(opt --init_checkpoint "${TEACHER_INIT}")
            $(opt --vocab_file "${VOCAB_FILE}") --max_seq_length ${MAX_SEQ_LENGTH}
            --batch_size ${BATCH} --learning_rate ${LR} --num_train_epochs ${EPOCHS}
            --train_ratio ${TRAIN_RATIO} --val_freq ${VAL_FREQ} --seed ${SEED} --amp ${AMP}
            --output_dir ${OUT}"
      # shellcheck disable=SC2086
      $(launcher) train_domain.py ${ARGS} --do_train ${EXTRA_ARGS}
      # shellcheck disable=SC2086
      ${PYTHON:-python} train_domain.py ${ARGS} --do_test --no_progress
    done
  done
done
