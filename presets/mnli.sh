# PRESET=mnli: the real-data configuration on MNLI by genre (reproduce.sh mnli; RESULTS.md).
# As presets/real.sh (all-MiniLM-L6-v2 teachers, 2-layer students from its blocks 1 and 2, the
# paper's T = 128), on GLUE's MNLI files in dataset/MNLI or the sample in ../shared/data.
# Every value below is only a default: the environment still wins.
#
# Chosen on dev (issue 37; `bash reproduce.sh mnli tune`, telephone's dev split, 427 pairs, one
# seed; RESULTS.md "MNLI"): the teacher rate from 5e-5, 1e-4, 2e-4 (3 epochs: dev 56.4, 59.7,
# 60.7), the student rate from 1e-4, 3e-4, 1e-3 (10 epochs of the 2e-4 teacher: 50.8, 51.5,
# 51.8); the epochs, the stage-4 and Meta-KD rates are presets/real.sh's (not swept here).
# LENGTH_BUCKETS=1: --length_buckets made a step 3.9x faster (bench.py --cases buckets) and a
# 2-epoch student 2.4x faster end to end, at dev 45.7 against 47.5 padded (one seed: inside the
# binomial error of about +-2.4 points); every MNLI run of the table uses it.
: "${TASKS=mnli}"
: "${MAX_SEQ_LENGTH=128}"
: "${TEACHER_CONFIG=}"
: "${TEACHER_INIT=all-MiniLM-L6-v2}"
: "${STUDENT_CONFIG=}"
: "${STUDENT_INIT=all-MiniLM-L6-v2}"
: "${STUDENT_INIT_LAYERS=1 2}"
: "${VOCAB_FILE=}"
: "${CACHE_DIR=runs/cache}"
: "${AMP=auto}"
: "${LENGTH_BUCKETS=1}"
# The students' rate: 1e-3 when they distil a teacher; on the labels alone (DISTILL=0, stages 2
# and 4) 1e-4, from `reproduce.sh mnli tune_labels` (telephone's dev: 5e-5 45.0, 1e-4 46.8, 2e-4
# 44.5, 5e-4 41.9, 1e-3 34.2): at 1e-3 cross-entropy alone left them predicting one class.
students_lr() { if [ "${DISTILL:-1}" = 0 ]; then echo 1e-4; else echo 1e-3; fi; }
case "${STAGE_NAME}" in
  train_domain|train_multi_domain|train_meta_teacher) : "${LR=2e-4}" "${EPOCHS=3}" ;;
  finetune_domain)       : "${LR=$(students_lr)}" "${EPOCHS=10}" ;;
  finetune_metakd)       : "${LR=1e-3}" "${EPOCHS=5}" "${INTERMEDIATE_EPOCHS=5}" ;;
  finetune_multi_domain) : "${LR=$(students_lr)}" "${EPOCHS=10}"
                         : "${VARIANTS=no_graph no_hierarchy hrkd uniform}" ;;
esac
