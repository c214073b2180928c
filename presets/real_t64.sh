# PRESET=real_t64: the old CPU configuration of RESULTS.md's T = 64 table (2026-11-26) and its
# reruns: presets/real.sh as it was until 2026-12-02 (T = 64, teachers 2 epochs, students 3,
# chosen on books' dev at T = 64), so that the old table can be rerun as it was:
#   PRESET=real_t64 OUT_ROOT=runs/amazon_t64 bash reproduce_amazon.sh table
# Only what differs is set here (each value only when unset: the environment still wins);
# presets/real.sh supplies the rest and, since its values are defaults too, keeps these.
: "${MAX_SEQ_LENGTH=64}"
case "${STAGE_NAME}" in
  train_domain|train_multi_domain)       : "${EPOCHS=2}" ;;
  finetune_domain|finetune_multi_domain) : "${EPOCHS=3}" ;;
esac
# shellcheck disable=SC1091
source presets/real.sh
