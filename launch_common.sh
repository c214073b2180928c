# Shared by the four stage launchers (sourced, not run): the torchrun launch, the per-process
# batch that keeps the paper's effective batch, and the data folder / domains of each task.

# The command that starts a stage script: plain python on one device, torchrun on several
# (as "$PYTHON -m torch.distributed.run", the module behind torchrun, so that PYTHON=echo
# prints every command instead of running it and the venv's interpreter is the one used).
launcher() {
  if [ "${NUM_GPU}" -gt 1 ]; then
    echo "${PYTHON:-python} -m torch.distributed.run --standalone --nproc_per_node ${NUM_GPU}"
  else
    echo "${PYTHON:-python}"
  fi
}

# The paper trained on 4 GPUs: the effective batch is 4x the per-GPU figure. Split it evenly.
per_process_batch() {
  local total=$1
  if [ $((total % NUM_GPU)) -ne 0 ]; then
    echo "error: total batch ${total} is not divisible by NUM_GPU=${NUM_GPU}" >&2
    return 1
  fi
  echo $((total / NUM_GPU))
}

# Task facts (domains, fit domain) are written once, in data_processing.py's processors; the
# launchers ask for them. (Under PYTHON=echo, the dry run, they are still asked from python3.)
task_fact() {  # TASK FIELD
  local python=${PYTHON:-python}
  if [ "${python}" = echo ]; then python=python3; fi
  "${python}" data_processing.py fact "$1" "$2" "$(data_dir_of "$1")"
}

# The data folder of a task: <TASK>_DIR (MNLI_DIR, AMAZON_DIR, ...), else dataset/<task>.
data_dir_of() {
  local var
  var="$(echo "$1" | tr '[:lower:]' '[:upper:]')_DIR"
  echo "${!var:-dataset/$1}"
}

# The domains of a task: <TASK>_DOMAINS if set (a subset), else all of the task's domains.
domains_of() {
  local var
  var="$(echo "$1" | tr '[:lower:]' '[:upper:]')_DOMAINS"
  if [ -n "${!var:-}" ]; then echo "${!var}"; else task_fact "$1" domains; fi
}

fit_domain_of() {
  task_fact "$1" fit_domain
}

# Optional flag only when its value is set: opt --vocab_file "$VOCAB_FILE"
opt() {
  if [ -n "$2" ]; then echo "$1 $2"; fi
}

# Flags every stage takes from the shared settings and from its own block (BATCH, LR, EPOCHS):
# common_args TRAIN_RATIO SEED
common_args() {
  echo "--max_seq_length ${MAX_SEQ_LENGTH} --batch_size ${BATCH} --learning_rate ${LR}" \
       "--num_train_epochs ${EPOCHS} --train_ratio $1 --val_freq ${VAL_FREQ} --seed $2" \
       "--amp ${AMP} $(opt --vocab_file "${VOCAB_FILE}") $(opt --cache_dir "${CACHE_DIR}")" \
       "--do_train $([ "${DO_TEST}" = 1 ] && echo --do_test) ${EXTRA_ARGS}"
}

# The seed of the teacher run a student of seed $1 distils (TEACHER_SEED, else the same seed).
teacher_seed() {
  echo "${TEACHER_SEED:-$1}"
}

# Teacher flags of stages 1 and 3 (TEACHER_CONFIG, TEACHER_INIT from the launcher's block;
# an empty TEACHER_CONFIG takes the config.json of TEACHER_INIT).
teacher_args() {
  echo "$(opt --model_config "${TEACHER_CONFIG}") $(opt --init_checkpoint "${TEACHER_INIT}")"
}

# Student and distillation flags of stages 2 and 4 (from the launcher's block).
student_args() {
  echo "$(opt --student_config "${STUDENT_CONFIG}") $(opt --student_init "${STUDENT_INIT}")" \
       "$(opt --student_init_layers "${STUDENT_INIT_LAYERS:-}")" \
       "--hidden_ratio ${HIDDEN_RATIO} --pred_ratio ${PRED_RATIO} --temperature ${TEMPERATURE}"
}

# PRESET=<name> loads presets/<name>.sh first: a named configuration (e.g. PRESET=real, the
# real-data configuration of RESULTS.md) whose values the environment can still override.
STAGE_NAME=$(basename "${BASH_SOURCE[1]:-$0}" .sh)
PRESET=${PRESET:-}
if [ -n "${PRESET}" ]; then
  if [ ! -f "presets/${PRESET}.sh" ]; then
    echo "error: presets/${PRESET}.sh: no such preset ($(ls presets | sed 's/\.sh$//' | tr '\n' ' '))" >&2
    exit 1
  fi
  # shellcheck disable=SC1090
  source "presets/${PRESET}.sh"
fi

# Defaults every launcher shares; each can be overridden from the environment.
NUM_GPU=${NUM_GPU:-1}
SEEDS=${SEEDS:-42}
TEACHER_SEED=${TEACHER_SEED:-}          # stages 2 and 4: distil this seed's teacher for every
                                        # student seed (empty: the teacher of the same seed)
AMP=${AMP:-off}                      # off | bf16 | fp16 (off reproduces the fp32 recipe)
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-128}
VAL_FREQ=${VAL_FREQ:-50}
TASKS=${TASKS:-"mnli amazon"}
MNLI_DIR=${MNLI_DIR:-dataset/MNLI}
AMAZON_DIR=${AMAZON_DIR:-dataset/amazon}
MNLI_DOMAINS=${MNLI_DOMAINS:-}          # empty: every genre (data_processing.py)
AMAZON_DOMAINS=${AMAZON_DOMAINS:-}      # empty: every domain
OUT_ROOT=${OUT_ROOT:-runs}
VOCAB_FILE=${VOCAB_FILE:-}
CACHE_DIR=${CACHE_DIR:-}             # tokenized-feature cache; empty: <data folder>/cache
DO_TEST=${DO_TEST:-1}                # 0: train and keep dev figures only (tuning runs)
EXTRA_ARGS=${EXTRA_ARGS:-}           # e.g. "--overwrite", "--resume", "--no_progress"

# Few-shot: the paper trains on p% of the training data; train_ratio = 0.9 x p / 100.
fewshot_ratio() {
  awk -v p="$1" 'BEGIN { printf "%.6g", 0.9 * p / 100 }'
}

# Calls the launcher's run_stage ROOT TRAIN_RATIO for the full data (MODE=full), for every
# few-shot percentage into ROOT/fewshot/p<percent> (MODE=fewshot), or both (MODE=both).
run_modes() {
  case "${MODE}" in
    full|both|fewshot) ;;
    *) echo "error: MODE must be full, fewshot or both, got ${MODE}" >&2; return 1 ;;
  esac
  local task
  for task in ${TASKS}; do  # an unknown task stops here, not inside a command's arguments
    task_fact "${task}" domains > /dev/null
  done
  if [ "${MODE}" != fewshot ]; then
    run_stage "${OUT_ROOT}" 0.9
  fi
  if [ "${MODE}" != full ]; then
    for PERCENT in ${FEWSHOT_PERCENTS}; do
      run_stage "${OUT_ROOT}/fewshot/p${PERCENT}" "$(fewshot_ratio "${PERCENT}")"
    done
  fi
}
