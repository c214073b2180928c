#!/usr/bin/env bash
# Stage 2: TinyBERT-KD, distil each domain's stage-1 teacher into a TinyBERT 4L-312, then test.
# Edit the block below, or set any of these variables in the environment, then:
#   bash finetune_domain.sh
# Teachers are read from $OUT_ROOT/train_domain/<task>/<domain>/seed<seed>; runs land in
# $OUT_ROOT/finetune_domain/<task>/<domain>/seed<seed>.
set -euo pipefail
cd "$(dirname "$0")"
source launch_common.sh

# ---- stage-2 hyper-parameters (paper: REFERENCE.md section 1) -------------------------------
TOTAL_BATCH=${TOTAL_BATCH:-32}        # 8 per GPU x 4 GPUs; kept whatever NUM_GPU is
LR=${LR:-5e-5}
EPOCHS=${EPOCHS:-10}
STUDENT_CONFIG=${STUDENT_CONFIG:-tinybert_4l_312}
STUDENT_INIT=${STUDENT_INIT-pretrained_ckpt/tinybert-4l-312}    # empty: random init
HIDDEN_RATIO=${HIDDEN_RATIO:-1}
PRED_RATIO=${PRED_RATIO:-1}
TEMPERATURE=${TEMPERATURE:-1}
TRAIN_RATIO=${TRAIN_RATIO:-0.9}
TEACHER_ROOT=${TEACHER_ROOT:-${OUT_ROOT}/train_domain}
STAGE_ROOT=${STAGE_ROOT:-${OUT_ROOT}/finetune_domain}
# ---------------------------------------------------------------------------------------------

BATCH=$(per_process_batch "${TOTAL_BATCH}")
for TASK in ${TASKS}; do
  for DOMAIN in $(domains_of "${TASK}"); do
    for SEED in ${SEEDS}; do
      OUT="${STAGE_ROOT}/${TASK}/${DOMAIN}/seed${SEED}"
      ARGS="--task ${TASK} --data_dir $(data_dir_of "${TASK}") --domain ${DOMAIN}
            --teacher_dir ${TEACHER_ROOT}/${TASK}/${DOMAIN}/seed${SEED}
            --student_config ${STUDENT_CONFIG} $(opt --student_init "${STUDENT_INIT}")
            $(opt --vocab_file "${VOCAB_FILE}") --max_seq_length ${MAX_SEQ_LENGTH}
            --batch_size ${BATCH} --learning_rate ${LR} --num_train_epochs ${EPOCHS}
            --hidden_ratio ${HIDDEN_RATIO} --pred_ratio ${PRED_RATIO}
            --temperature ${TEMPERATURE} --train_ratio ${TRAIN_RATIO} --val_freq ${VAL_FREQ}
            --seed ${SEED} --amp ${AMP} --output_dir ${OUT}"
      # shellcheck disable=SC2086
      $(launcher) finetune_domain.py ${ARGS} --do_train ${EXTRA_ARGS}
      # shellcheck disable=SC2086
      ${PYTHON:-python} finetune_domain.py ${ARGS} --do_test --no_progress
    done
  done
done
