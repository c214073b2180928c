# Shared by the four stage launchers (sourced, not run): the torchrun launch, the per-process
# batch that keeps the paper's effective batch, and the data folder / domains of each task.

# The interpreter: $PYTHON, else the venv that `make setup` builds, else python3. PYTHON=echo
# prints every command instead of running it (a dry run).
default_python() {
  if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

# The python that answers questions about the task (under PYTHON=echo still a real one; these
# helpers import neither torch nor the models).
fact_python() {
  if [ "${PYTHON}" = echo ]; then default_python; else echo "${PYTHON}"; fi
}

# LAUNCH: the command that starts a stage script: plain python on one device, torchrun on
# several (as "$PYTHON -m torch.distributed.run", the module behind torchrun, so that
# PYTHON=echo prints every command and the venv's interpreter is the one used).
set_launch() {
  LAUNCH=("${PYTHON}")
  if [ "${NUM_GPU}" -gt 1 ]; then
    LAUNCH+=(-m torch.distributed.run --standalone --nproc_per_node "${NUM_GPU}")
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
# launchers ask for them.
task_fact() {  # TASK FIELD
  "$(fact_python)" data_processing.py fact "$1" "$2" "$(data_dir_of "$1")"
}

# The name of the variable holding a task's data folder: MNLI_DIR, AMAZON_DIR, CUSTOM_DIR, ...
data_dir_var() {
  echo "$(echo "$1" | tr '[:lower:]' '[:upper:]')_DIR"
}

# The data folder of a task: <TASK>_DIR, else dataset/<task>.
data_dir_of() {
  local var
  var=$(data_dir_var "$1")
  echo "${!var:-dataset/$1}"
}

# Stop with the variable to set when a task's data folder is not there (a dry run only warns:
# it prints the commands; a task whose domains live in its folder still stops, asking for them).
check_data_dir() {
  local var dir level=error
  var=$(data_dir_var "$1")
  dir=$(data_dir_of "$1")
  if [ -d "${dir}" ]; then return 0; fi
  if [ "${PYTHON}" = echo ]; then level=warning; fi
  if [ -z "${!var:-}" ]; then
    echo "${level}: ${var} is not set and ${dir} does not exist: set ${var} to the folder of" \
         "the $1 data (python download.py fetches MNLI and Amazon into dataset/)" >&2
  else
    echo "${level}: ${var}=${dir}: no such folder" >&2
  fi
  [ "${level}" = warning ]
}

# The domains of a task: <TASK>_DOMAINS if set (a subset), else all of the task's domains.
domains_of() {
  local var
  var="$(echo "$1" | tr '[:lower:]' '[:upper:]')_DOMAINS"
  if [ -n "${!var:-}" ]; then echo "${!var}"; else task_fact "$1" domains; fi
}

# EXTRA: the words of EXTRA_ARGS (free-form flags, split on whitespace as typed).
set_extra() {
  read -r -a EXTRA <<< "${EXTRA_ARGS}"
}

# COMMON: flags every stage takes from the shared settings and from its own block (BATCH, LR,
# EPOCHS). Paths are kept whole (a folder name may hold spaces). set_common TRAIN_RATIO SEED
set_common() {
  COMMON=(--max_seq_length "${MAX_SEQ_LENGTH}" --batch_size "${BATCH}" --learning_rate "${LR}"
          --num_train_epochs "${EPOCHS}" --train_ratio "$1" --val_freq "${VAL_FREQ}" --seed "$2"
          --amp "${AMP}" --do_train)
  if [ -n "${STEPS:-}" ]; then COMMON+=(--max_steps "${STEPS}"); fi
  if [ -n "${VOCAB_FILE}" ]; then COMMON+=(--vocab_file "${VOCAB_FILE}"); fi
  if [ -n "${CACHE_DIR}" ]; then COMMON+=(--cache_dir "${CACHE_DIR}"); fi
  if [ "${DO_TEST}" = 1 ]; then COMMON+=(--do_test); fi
  if [ "${SKIP_FINISHED}" = 1 ]; then COMMON+=(--skip_finished); fi
  if [ "${LENGTH_BUCKETS}" = 1 ]; then COMMON+=(--length_buckets); fi
  set_extra
  COMMON+=(${EXTRA[@]+"${EXTRA[@]}"})
}

# Whether a run said it finished (its test too when DO_TEST=1); torch-free, so it is quick.
# Interrupted runs are not finished: with SKIP_FINISHED=1 the stage resumes them.
run_finished() {
  if [ "${DO_TEST}" = 1 ]; then
    "$(fact_python)" utils.py finished "$1" --tested
  else
    "$(fact_python)" utils.py finished "$1"
  fi
}

# The seed of the teacher run a student of seed $1 distils (TEACHER_SEED, else the same seed).
teacher_seed() {
  echo "${TEACHER_SEED:-$1}"
}

# TEACHER: flags of stages 1 and 3 (TEACHER_CONFIG, TEACHER_INIT from the launcher's block;
# an empty TEACHER_CONFIG takes the config.json of TEACHER_INIT).
set_teacher() {
  TEACHER=()
  if [ -n "${TEACHER_CONFIG}" ]; then TEACHER+=(--model_config "${TEACHER_CONFIG}"); fi
  if [ -n "${TEACHER_INIT}" ]; then TEACHER+=(--init_checkpoint "${TEACHER_INIT}"); fi
}

# STUDENT: student and distillation flags of stages 2 and 4 (from the launcher's block).
set_student() {
  set_student_checkpoint
  STUDENT=(--hidden_ratio "${HIDDEN_RATIO}" --pred_ratio "${PRED_RATIO}"
           --temperature "${TEMPERATURE}" ${STUDENT[@]+"${STUDENT[@]}"})
}
# STUDENT: the teacher cache and the student's config and initial weights alone (Meta-KD's
# stage B, whose loss terms are not TinyBERT's).
set_student_checkpoint() {
  STUDENT=()
  if [ -n "${TEACHER_CACHE}" ]; then STUDENT+=(--teacher_cache "${TEACHER_CACHE}"); fi
  if [ -n "${STUDENT_CONFIG}" ]; then STUDENT+=(--student_config "${STUDENT_CONFIG}"); fi
  if [ -n "${STUDENT_INIT}" ]; then STUDENT+=(--student_init "${STUDENT_INIT}"); fi
  if [ -n "${STUDENT_INIT_LAYERS:-}" ]; then
    local blocks
    read -r -a blocks <<< "${STUDENT_INIT_LAYERS}"
    STUDENT+=(--student_init_layers "${blocks[@]}")
  fi
}

# STUDENT_MODEL: the student's architecture and initial weights as flags of stages 1 and 3,
# for the no-distillation baseline (DISTILL=0 in stages 2 and 4: the student trained on the
# labels alone, same data, rate and epochs, no teacher).
set_student_model() {
  STUDENT_MODEL=()
  if [ -n "${STUDENT_CONFIG}" ]; then STUDENT_MODEL+=(--model_config "${STUDENT_CONFIG}"); fi
  if [ -n "${STUDENT_INIT}" ]; then STUDENT_MODEL+=(--init_checkpoint "${STUDENT_INIT}"); fi
  if [ -n "${STUDENT_INIT_LAYERS:-}" ]; then
    local blocks
    read -r -a blocks <<< "${STUDENT_INIT_LAYERS}"
    STUDENT_MODEL+=(--init_layers "${blocks[@]}")
  fi
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
PYTHON=${PYTHON:-$(default_python)}
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
CACHE_DIR=${CACHE_DIR:-}             # tokenized-feature cache; empty: ~/.cache/hrkd
DO_TEST=${DO_TEST:-1}                # 0: train and keep dev figures only (tuning runs)
SKIP_FINISHED=${SKIP_FINISHED:-0}    # 1: leave finished runs alone, resume interrupted ones
LENGTH_BUCKETS=${LENGTH_BUCKETS:-0}  # 1: --length_buckets (batches of similar length, each
                                     # padded to its longest input; README "Length buckets")
EXTRA_ARGS=${EXTRA_ARGS:-}           # e.g. "--overwrite", "--resume", "--no_progress"
TEACHER_CACHE=${TEACHER_CACHE:-}     # stages 2 and 4: on | off (empty: the scripts' default, on)

MAX_STEPS=${MAX_STEPS:-}              # full data: this many steps (empty: EPOCHS decide)
FEWSHOT_STEPS=${FEWSHOT_STEPS:-}      # each few-shot ratio: this many steps (empty: EPOCHS,
                                      # the released recipe, which is few steps on little data),
                                      # or per ratio, PERCENT:STEPS pairs ("2:30 20:100")

# The steps of one few-shot ratio (percent) from FEWSHOT_STEPS: its own pair when FEWSHOT_STEPS
# holds PERCENT:STEPS pairs, else the one number (or nothing: EPOCHS decide). A missing ratio or
# a count that is not a positive integer is an error naming the variable.
fewshot_steps() {
  local entry steps=""
  case "${FEWSHOT_STEPS}" in
    *:*)
      for entry in ${FEWSHOT_STEPS}; do
        if [ "${entry%%:*}" = "$1" ]; then steps=${entry#*:}; fi
      done
      if [ -z "${steps}" ]; then
        echo "error: FEWSHOT_STEPS=\"${FEWSHOT_STEPS}\" has no PERCENT:STEPS pair for ${1}% (give one for every ratio of FEWSHOT_PERCENTS, or one number for all)" >&2
        return 1
      fi ;;
    *) steps=${FEWSHOT_STEPS} ;;
  esac
  case "${steps}" in
    "") ;;
    *[!0-9]*|0*)
      echo "error: FEWSHOT_STEPS=\"${FEWSHOT_STEPS}\": steps must be a positive integer, got '${steps}'" >&2
      return 1 ;;
  esac
  echo "${steps}"
}

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
  for task in ${TASKS}; do  # an unknown task or a missing folder stops here, before any run
    check_data_dir "${task}"
    task_fact "${task}" domains > /dev/null
  done
  if [ "${MODE}" != full ]; then  # every ratio's length, before any run
    for PERCENT in ${FEWSHOT_PERCENTS}; do fewshot_steps "${PERCENT}" > /dev/null || return 1; done
  fi
  set_launch
  if [ "${MODE}" != fewshot ]; then
    STEPS=${MAX_STEPS}
    run_stage "${OUT_ROOT}" 0.9
  fi
  if [ "${MODE}" != full ]; then
    for PERCENT in ${FEWSHOT_PERCENTS}; do
      STEPS=$(fewshot_steps "${PERCENT}")
      run_stage "${OUT_ROOT}/fewshot/p${PERCENT}" "$(fewshot_ratio "${PERCENT}")"
    done
  fi
}
