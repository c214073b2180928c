#!/usr/bin/env bash
# The paper's tables on real data, one task at a time: TASK amazon (the reviews, presets/real.sh)
# or mnli (the genres, presets/mnli.sh), in the real-data configuration (all-MiniLM-L6-v2
# teachers, 2-layer students from its blocks), then report.py. RESULTS.md holds what these
# commands produced. reproduce_amazon.sh STEP is reproduce.sh amazon STEP.
#   bash reproduce.sh mnli table     # the MNLI table (every step below takes either task)
#   bash reproduce.sh amazon tune      # dev sweeps behind presets/real.sh (no test figures)
#   bash reproduce.sh amazon tune_labels  # dev sweep of the rate of the students on the labels
#                                      # alone (part of tune)
#   bash reproduce.sh amazon tune_fewshot  # dev sweep of the few-shot training length
#   bash reproduce.sh amazon tune_fewshot_multi  # the same for the multi-domain students
#   bash reproduce.sh amazon table     # every row: stages 1-4, the mix teacher, the students on
#                                      # the labels alone, Meta-KD, TF-IDF; report.py
#   bash reproduce.sh amazon fewshot   # teachers, TinyBERT-KD, multi-domain KD and HRKD on
#                                      # FEWSHOT_PERCENTS of the training data
#   bash reproduce.sh amazon left      # what table and fewshot still have to run, how long
#   bash reproduce.sh amazon deploy    # deploy_eval.py on the table's runs: the trade-off plot
#   bash reproduce.sh amazon all       # table, then fewshot
#   bash reproduce.sh amazon study     # label-noise study: NOISY_DOMAIN's training labels flipped
#                                      # with FLIP_PROB (default kitchen, 0.4), stage 3 on them,
#                                      # stage 4 with STUDY_VARIANTS for every seed of SEEDS; then
#                                      # STUDY_CLEAN_VARIANTS with every domain clean (the table's
#                                      # stage-3 teacher)
# JOBS=2 bash reproduce.sh amazon all: the stage processes two at a time (scheduler.py, Ray
# tasks on a local Ray instance); RAY_ADDRESS=head:6379 runs them over a Ray cluster (README,
# More machines).
# Settings from the environment: SEEDS (default "42"), PRESET (default real: T = 128;
# real_t64: the old CPU configuration; mnli for MNLI), AMAZON_DIR (default dataset/amazon, else
# ../shared/data/amazon), MNLI_DIR (default dataset/MNLI, else ../shared/data/mnli_sample),
# OUT_ROOT (default runs/<task>_real), NUM_GPU, AMP, and any launcher
# variable (e.g. FEWSHOT_STEPS, TUNE_TEACHER_LRS, TUNE_STUDENT_EPOCHS).
# Every stage's wall time is appended to $OUT_ROOT/timings.tsv.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'TEXT'
usage: bash reproduce.sh TASK STEP   (TASK: amazon, the real reviews, PRESET=real; or mnli,
       the MNLI genres, PRESET=mnli; RESULTS.md)

  tune      dev sweeps behind the preset, the fit domain only (books, telephone; no test
            figures); ends with tune_labels
  tune_labels  dev sweep of the learning rate of the students on the labels alone (DISTILL=0;
            TUNE_LABELS_LRS, default "5e-5 1e-4 2e-4 5e-4 1e-3"), the fit domain (no test
            figures)
  tune_fewshot  dev sweep of the few-shot steps (TUNE_FEWSHOT_STEPS, default "30 100") at
            each ratio (TUNE_FEWSHOT_PERCENTS, or one in TUNE_FEWSHOT_PERCENT; default
            FEWSHOT_PERCENTS), the fit domain: teachers, then students of the best teacher (no test
            figures)
  tune_fewshot_multi  the same for stage 4: one multi-domain teacher at the smallest ratio
            (the preset's few-shot steps), then its students (TUNE_FEWSHOT_VARIANTS, default
            "hrkd no_graph") for each of TUNE_FEWSHOT_STEPS (default "30 100"); dev of every
            domain (no test figures)
  table     every row: stages 1-4 (the paper's rows and ablations), the mix teacher (one head
            on the pooled domains), the students on the labels alone, Meta-KD (its
            meta-teacher, then a student per domain), TF-IDF; report.py
  fewshot   teachers, TinyBERT-KD, multi-domain KD and HRKD on FEWSHOT_PERCENTS of the
            training reviews (FEWSHOT_STEPS steps, per stage and ratio: presets/real.sh)
  all       table, then fewshot
  study     the label-noise study (NOISY_DOMAIN, FLIP_PROB; stage 3 then stage 4)
  left      what table and fewshot still have to run under OUT_ROOT, with estimated times
            from the runs that finished there (table and fewshot print it when they start)
  deploy    the deployed forms (PyTorch, ONNX Runtime fp32 / int8) of the table's finished
            runs of DEPLOY_SEEDS (default 42): accuracy, batch-1 latency, size; report.py

Measured on the 2-core development machine in the old CPU configuration (T = 64, one seed,
3 student epochs, before the rows above were added; RESULTS.md):
  tune      about 20 minutes (3 teacher and 4 student runs)
  tune_fewshot  about 52 minutes at T = 128 (2 teacher, 2 student runs; sharing the CPU with a
            table's run)
  table     79 minutes (stage 1 748 s, stage 3 714 s, stage 2 759 s, stage 4 2519 s)
  fewshot   about 11 minutes for one ratio (10%)
  study     about 2 hours (stage 3 plus 8 stage-4 runs, the meta ones 2.7x slower)

Settings from the environment: SEEDS, MAX_SEQ_LENGTH, AMAZON_DIR / MNLI_DIR, OUT_ROOT
(runs/<task>_real),
PYTHON (default: .venv/bin/python, else python3; PYTHON=echo prints the commands and writes
nothing), NUM_GPU, AMP, and any launcher variable. Runs that finished are skipped and
interrupted ones resumed (SKIP_FINISHED=1), so a step can be rerun after a stop.
JOBS=N (table, fewshot, all): N stage processes at a time (scheduler.py: Ray tasks, one per
domain and stage-4 variant, each after its teachers, the students of finished teachers first),
THREADS threads each (default: the cores over N); e.g. JOBS=2 on the 2-core machine of
RESULTS.md. RAY_ADDRESS=HOST:PORT: the same over a Ray cluster (as many at a time as its CPUs
hold unless JOBS says; THREADS default 1; GPUS_PER_RUN=0.25 puts four runs on a GPU; README,
More machines).
TEXT
  local timings=${OUT_ROOT:-runs/${TASK:-amazon}_real}/timings.tsv
  if [ -f "${timings}" ]; then
    echo
    echo "Recorded in ${timings} (latest first):"
    tail -n 8 "${timings}" | sort -r | awk -F '\t' '{ printf "  %s  %-45s %6d s\n", $1, $2, $3 }'
  fi
}

TASK=${1:-}
case "${TASK}" in
  amazon|mnli) shift ;;
  ""|help|-h|--help) usage; exit 0 ;;
  *) echo "error: unknown task '${TASK}' (amazon or mnli: bash reproduce.sh TASK STEP)" >&2
     exit 1 ;;
esac
STEP=${1:-}
case "${STEP}" in
  tune|tune_labels|tune_fewshot|tune_fewshot_multi|table|fewshot|all|study|left|deploy) ;;
  ""|help|-h|--help) usage; exit 0 ;;
  *) echo "error: unknown step '${STEP}' (tune, tune_labels, tune_fewshot, tune_fewshot_multi, table, fewshot, all, study, left or deploy; see --help)" >&2
     exit 1 ;;
esac

# The venv's interpreter, as make uses it; say how to get one when there is none.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  elif python3 -c "import torch" 2> /dev/null; then
    PYTHON=python3
  else
    echo "error: no .venv here and python3 has no torch: run 'make setup' first (or set" \
         "PYTHON to an interpreter with requirements.txt installed)" >&2
    exit 1
  fi
fi
export PYTHON
DRY_RUN=0
if [ "${PYTHON}" = echo ]; then DRY_RUN=1; fi
# Each task's preset, data folder (dataset/ as download.py lays it out, else the development
# copy in ../shared) and runs folder.
case "${TASK}" in
  amazon) export PRESET=${PRESET:-real}
          if [ -z "${AMAZON_DIR:-}" ]; then
            AMAZON_DIR=dataset/amazon
            [ -d "${AMAZON_DIR}" ] || AMAZON_DIR=../shared/data/amazon
          fi
          export AMAZON_DIR DATA_DIR=${AMAZON_DIR} ;;
  mnli)   export PRESET=${PRESET:-mnli}
          if [ -z "${MNLI_DIR:-}" ]; then
            MNLI_DIR=dataset/MNLI
            [ -d "${MNLI_DIR}" ] || MNLI_DIR=../shared/data/mnli_sample
          fi
          export MNLI_DIR DATA_DIR=${MNLI_DIR} ;;
esac
export TASKS=${TASK}
export OUT_ROOT=${OUT_ROOT:-runs/${TASK}_real}
# the task's fit domain (the tuning runs' domain) and domains, asked from data_processing.py
FACT_PYTHON=${PYTHON}
if [ "${PYTHON}" = echo ]; then FACT_PYTHON=python3; [ -x .venv/bin/python ] && FACT_PYTHON=.venv/bin/python; fi
FIT=$("${FACT_PYTHON}" data_processing.py fact "${TASK}" fit_domain)
LAST_DOMAIN=$("${FACT_PYTHON}" data_processing.py fact "${TASK}" domains | awk '{print $NF}')
DOMAINS_VAR=$(echo "${TASK}" | tr '[:lower:]' '[:upper:]')_DOMAINS
export SEEDS=${SEEDS:-42}
export FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-"2 5 10 20"}
export EXTRA_ARGS=${EXTRA_ARGS:-"--no_progress"}
export SKIP_FINISHED=${SKIP_FINISHED:-1}
TIMINGS=${OUT_ROOT}/timings.tsv

timed() {  # name, command...: run it and append its wall time to timings.tsv (not in dry runs)
  local name=$1 begin
  shift
  begin=$(date +%s)
  echo "== ${name} ($(date '+%F %T'))"
  "$@"
  if [ "${DRY_RUN}" = 0 ]; then
    mkdir -p "${OUT_ROOT}"
    printf '%s\t%s\t%s\t%s\n' "$(date '+%F %T')" "${name}" "$(( $(date +%s) - begin ))" \
      "MODE=${MODE:-full} SEEDS=${SEEDS} T=${MAX_SEQ_LENGTH:-preset}" >> "${TIMINGS}"
  fi
}

best_dev() {  # run directories...: the finished one with the best mean dev accuracy
  if [ "${DRY_RUN}" = 1 ]; then echo "$1"; return; fi
  "${PYTHON}" - "$@" <<'PY'
import json, sys
results = {run: json.load(open(f"{run}/results.json")) for run in sys.argv[1:]}
for run in [run for run, r in results.items() if not r.get("finished")]:
    print(f"  left out (not finished): {run}", file=sys.stderr)
scores = {run: r["dev"]["best_mean"] for run, r in results.items() if r.get("finished")}
if not scores:
    sys.exit("error: no finished run among " + " ".join(sys.argv[1:]))
for run, score in scores.items():
    print(f"  dev {100 * score:.2f}  {run}", file=sys.stderr)
print(max(scores, key=scores.get))
PY
}

link_teacher() {  # teacher run, folder: the tuned student distils that teacher
  if [ "${DRY_RUN}" = 1 ]; then echo "ln -s $1 $2/seed42"; return; fi
  mkdir -p "$2"
  ln -sfn "$(realpath "$1")" "$2/seed42"
}

tfidf() {  # root train_ratio
  "${PYTHON}" baseline_tfidf.py --task "${TASK}" --data_dir "${DATA_DIR}" \
    --output_dir "$1/tfidf/${TASK}" --train_ratio "$2"
}

table() {
  export MODE=$1
  if [ "${DRY_RUN}" = 0 ]; then left "${MODE}"; fi
  timed "stage 1: single-domain teachers" bash train_domain.sh
  timed "stage 3: multi-domain teacher" bash train_multi_domain.sh
  timed "stage 2: TinyBERT-KD students" bash finetune_domain.sh
  if [ "${MODE}" = full ]; then
    timed "stage 4: multi-domain students" bash finetune_multi_domain.sh
    timed "stage 3, pooled: the mix teacher (one head)" env POOLED=1 bash train_multi_domain.sh
    timed "stage 2 without a teacher: students on the labels alone" \
      env DISTILL=0 bash finetune_domain.sh
    timed "stage 4 without a teacher: the multi-domain student on the labels alone" \
      env DISTILL=0 bash finetune_multi_domain.sh
    timed "Meta-KD stage A: the meta-teacher" bash train_meta_teacher.sh
    timed "Meta-KD stage B: the students of the meta-teacher" bash finetune_metakd.sh
    timed "TF-IDF + logistic regression" tfidf "${OUT_ROOT}" 0.9
  else
    # the few-shot study's methods: multi-domain KD and HRKD (the table has the ablations)
    VARIANTS=${FEWSHOT_VARIANTS:-"no_graph hrkd"} \
      timed "stage 4: multi-domain students" bash finetune_multi_domain.sh
    for PERCENT in ${FEWSHOT_PERCENTS}; do
      tfidf "${OUT_ROOT}/fewshot/p${PERCENT}" "$(awk -v p="${PERCENT}" 'BEGIN{printf "%.6g", 0.9*p/100}')"
    done
  fi
  "${PYTHON}" report.py --runs "${OUT_ROOT}" --out "${OUT_ROOT}/report" --tasks "${TASK}"
}

# The deployed forms of the table's models (deploy_eval.py: PyTorch, ONNX Runtime fp32 and
# int8 on the test sets, batch-1 latency, size) for the seeds in DEPLOY_SEEDS, then report.py's
# trade-off plot. Runs that already have a deployment.json are left alone.
deploy() {
  local seed run ask=${PYTHON}  # ask: a real interpreter for the torch-free check, dry runs too
  if [ "${DRY_RUN}" = 1 ]; then ask=python3; [ -x .venv/bin/python ] && ask=.venv/bin/python; fi
  for seed in ${DEPLOY_SEEDS:-42}; do
    for run in "${OUT_ROOT}"/{train_domain,finetune_domain,labels_only_domain,finetune_metakd}/"${TASK}"/*/seed"${seed}" \
               "${OUT_ROOT}"/{train_multi_domain,train_pooled,labels_only_multi_domain,train_meta_teacher}/"${TASK}"/seed"${seed}" \
               "${OUT_ROOT}"/finetune_multi_domain/"${TASK}"/*/seed"${seed}"; do
      [ -d "${run}" ] || continue
      if [ -f "${run}/deployment.json" ]; then continue; fi
      if "${ask}" utils.py finished "${run}" --tested; then
        "${PYTHON}" deploy_eval.py "${run}" --data_dir "${DATA_DIR}"
      fi
    done
  done
  "${PYTHON}" report.py --runs "${OUT_ROOT}" --out "${OUT_ROOT}/report" --tasks "${TASK}"
}

# What the table and the few-shot study (or one of them: full | fewshot) still have to run,
# from a dry run of their commands (plan.py: each run's state, estimated time left). Runs with
# nothing alike finished under OUT_ROOT take the pace of the committed runs under PACE_FROM
# (default results/) that ran on this kind of machine, so a fresh clone gets estimates too.
left() {
  local modes=${1:-"full fewshot"} mode step machine
  machine=$("${PYTHON}" -c "import torch, runtime; print(runtime.describe_machine(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2> /dev/null || true)
  for mode in ${modes}; do
    step=table; [ "${mode}" = fewshot ] && step=fewshot
    echo "-- ${step}: what is left under ${OUT_ROOT}"
    # SKIP_FINISHED=0: every run's command, finished or not (stage 4 leaves finished
    # variants out of its command otherwise, and plan.py would not count them as finished)
    SKIP_FINISHED=0 PYTHON=echo bash "$0" "${TASK}" "${step}" 2> /dev/null \
      | "${PYTHON}" plan.py --runs "${OUT_ROOT}" --pace "${PACE_FROM:-results}" \
          ${machine:+--machine "${machine}"}
  done
}

# Dev sweeps on the fit domain (books, telephone), one seed: the stage-1 learning rate (stage 3 trains the
# same model on the same data with the same 32 examples per domain and step, and takes it), then
# the student's learning rate and initial blocks with stage 2 from the best stage-1 teacher
# (stage 4 takes them).
tune() {
  local root=${OUT_ROOT}/tune teacher best lr
  export "${DOMAINS_VAR}=${FIT}" SEEDS=42 MODE=full DO_TEST=0
  for lr in ${TUNE_TEACHER_LRS:-5e-5 1e-4 2e-4}; do
    OUT_ROOT=${root}/teacher_lr${lr} LR=${lr} timed "tune stage 1 lr ${lr}" \
      env ${TUNE_TEACHER_EPOCHS:+EPOCHS=${TUNE_TEACHER_EPOCHS}} bash train_domain.sh
  done
  echo "stage-1 dev (${FIT}):"
  teacher=$(best_dev "${root}"/teacher_lr*/train_domain/${TASK}/${FIT}/seed42)
  for lr in ${TUNE_STUDENT_LRS:-1e-4 3e-4 1e-3}; do
    link_teacher "${teacher}" "${root}/student_lr${lr}/train_domain/${TASK}/${FIT}"
    OUT_ROOT=${root}/student_lr${lr} LR=${lr} timed "tune stage 2 lr ${lr}" \
      env ${TUNE_STUDENT_EPOCHS:+EPOCHS=${TUNE_STUDENT_EPOCHS}} bash finetune_domain.sh
  done
  echo "stage-2 dev (${FIT}), blocks ${STUDENT_INIT_LAYERS:-preset}:"
  best=$(best_dev "${root}"/student_lr*/finetune_domain/${TASK}/${FIT}/seed42)
  lr=${best#"${root}"/student_lr}; lr=${lr%%/*}
  for blocks in ${TUNE_STUDENT_BLOCKS-"3_6"}; do  # empty: no block sweep
    local dir=${root}/student_blocks${blocks}
    link_teacher "${teacher}" "${dir}/train_domain/${TASK}/${FIT}"
    OUT_ROOT=${dir} LR=${lr} STUDENT_INIT_LAYERS=${blocks//_/ } \
      timed "tune stage 2 blocks ${blocks} lr ${lr}" \
      env ${TUNE_STUDENT_EPOCHS:+EPOCHS=${TUNE_STUDENT_EPOCHS}} bash finetune_domain.sh
  done
  if [ -n "${TUNE_STUDENT_BLOCKS-3_6}" ]; then
    echo "stage-2 dev (${FIT}), blocks:"
    best_dev "${root}"/student_lr"${lr}"/finetune_domain/${TASK}/${FIT}/seed42 \
      "${root}"/student_blocks*/finetune_domain/${TASK}/${FIT}/seed42 > /dev/null
  fi
  tune_labels
}

# The students on the labels alone (DISTILL=0: the student's model, data and epochs, no teacher)
# get their own rate on the fit domain's dev split: the distilled students' rate need not suit
# cross-entropy alone (on MNLI, 1e-3 left them predicting one class from the first evaluation;
# RESULTS.md). Stage 4's student on the labels alone takes the same rate.
tune_labels() {
  local root=${OUT_ROOT}/tune lr
  export "${DOMAINS_VAR}=${FIT}" SEEDS=42 MODE=full DO_TEST=0
  for lr in ${TUNE_LABELS_LRS:-5e-5 1e-4 2e-4 5e-4 1e-3}; do
    OUT_ROOT=${root}/labels_lr${lr} LR=${lr} timed "tune stage 2 on the labels alone, lr ${lr}" \
      env DISTILL=0 ${TUNE_STUDENT_EPOCHS:+EPOCHS=${TUNE_STUDENT_EPOCHS}} bash finetune_domain.sh
  done
  echo "dev of the students on the labels alone (${FIT}):"
  best_dev "${root}"/labels_lr*/labels_only_domain/${TASK}/${FIT}/seed42 > /dev/null
}

# The few-shot training length, on dev, per ratio (TUNE_FEWSHOT_PERCENTS, default every ratio of
# FEWSHOT_PERCENTS): at each, each candidate of TUNE_FEWSHOT_STEPS trains a fit-domain teacher for
# that many steps, evaluated every TUNE_FEWSHOT_VAL_FREQ steps; then each candidate trains a
# TinyBERT-KD student of the best teacher. Neither the released recipe's epochs (at 2%, 3 steps
# for a teacher: chance) nor one length for every ratio holds up: 30 steps that suit 2% leave a
# student near chance at 10%. presets/real.sh carries what dev chose, per stage and ratio.
tune_fewshot() {
  local percent
  for percent in ${TUNE_FEWSHOT_PERCENTS:-${TUNE_FEWSHOT_PERCENT:-${FEWSHOT_PERCENTS}}}; do
    tune_fewshot_at "${percent}"
  done
}

tune_fewshot_at() {  # percent
  local percent=$1 root=${OUT_ROOT}/tune_fewshot
  local steps teacher sub=fewshot/p$1
  export "${DOMAINS_VAR}=${FIT}" SEEDS=42 MODE=fewshot DO_TEST=0 FEWSHOT_PERCENTS=${percent}
  export VAL_FREQ=${TUNE_FEWSHOT_VAL_FREQ:-25}
  for steps in ${TUNE_FEWSHOT_STEPS:-30 100}; do
    OUT_ROOT=${root}/teacher_steps${steps} FEWSHOT_STEPS=${steps} \
      timed "tune few-shot stage 1, ${percent}%, ${steps} steps" bash train_domain.sh
  done
  echo "few-shot stage-1 dev (${FIT}, ${percent}%):"
  teacher=$(best_dev "${root}"/teacher_steps*/"${sub}"/train_domain/${TASK}/${FIT}/seed42)
  for steps in ${TUNE_FEWSHOT_STEPS:-30 100}; do
    link_teacher "${teacher}" "${root}/student_steps${steps}/${sub}/train_domain/${TASK}/${FIT}"
    OUT_ROOT=${root}/student_steps${steps} FEWSHOT_STEPS=${steps} \
      timed "tune few-shot stage 2, ${percent}%, ${steps} steps" bash finetune_domain.sh
  done
  echo "few-shot stage-2 dev (${FIT}, ${percent}%):"
  best_dev "${root}"/student_steps*/"${sub}"/finetune_domain/${TASK}/${FIT}/seed42 > /dev/null
}

# The few-shot training length of stage 4, on dev. Stage 2's choice need not carry over: a
# stage-4 student fits its random maps to the hidden states of four domains at once, and it is
# judged on every domain's dev split (720 reviews, not books' 170). At the smallest ratio one multi-domain teacher trains for the preset's
# few-shot steps (stage 3's, which takes stage 1's choice); then its students, each variant of
# TUNE_FEWSHOT_VARIANTS, train for each candidate of TUNE_FEWSHOT_STEPS.
tune_fewshot_multi() {
  local percent=${TUNE_FEWSHOT_PERCENT:-${FEWSHOT_PERCENTS%% *}} root=${OUT_ROOT}/tune_fewshot_multi
  local steps sub=fewshot/p${percent} teacher
  export SEEDS=42 MODE=fewshot DO_TEST=0 FEWSHOT_PERCENTS=${percent}
  export VAL_FREQ=${TUNE_FEWSHOT_VAL_FREQ:-25}
  OUT_ROOT=${root}/teacher timed "tune few-shot stage 3, ${percent}%, the preset's steps" \
    bash train_multi_domain.sh
  teacher=${root}/teacher/${sub}/train_multi_domain/${TASK}/seed42
  for steps in ${TUNE_FEWSHOT_STEPS:-30 100}; do
    link_teacher "${teacher}" "${root}/student_steps${steps}/${sub}/train_multi_domain/${TASK}"
    OUT_ROOT=${root}/student_steps${steps} FEWSHOT_STEPS=${steps} \
      VARIANTS=${TUNE_FEWSHOT_VARIANTS:-"hrkd no_graph"} \
      timed "tune few-shot stage 4, ${percent}%, ${steps} steps" bash finetune_multi_domain.sh
  done
  echo "few-shot stage-4 dev (every domain, ${percent}%):"
  best_dev "${root}"/student_steps*/"${sub}"/finetune_multi_domain/${TASK}/*/seed42 > /dev/null
}

# The label-noise study: does a weighting give the unreliable domain less than 1/D, and what
# does it cost when every domain is clean? NOISY_DOMAIN's training labels are flipped with
# FLIP_PROB; stage 3 (seed TEACHER_SEED) learns from them; stage 4 runs STUDY_VARIANTS for every
# student seed of SEEDS against that one teacher. The meta-learned weightings use the gold
# objective on the dev split (the only labels the study trusts) and a meta rate that lets Adam
# move a score by several units within the run's 153 steps (1e-3 moves it by at most ~0.15).
# The clean half (STUDY_CLEAN_VARIANTS) distils the table's stage-3 teacher (run `table` first).
# Runs that already finished are skipped, so the study can be extended seed by seed:
#   bash reproduce.sh amazon study                                        # seed 42, everything
#   SEEDS=43 STUDY_VARIANTS="uniform hrkd" STUDY_CLEAN_VARIANTS="" bash reproduce.sh amazon study
#   SEEDS=43 STUDY_VARIANTS="meta_gold meta_scorer_gold" \
#     STUDY_CLEAN_VARIANTS="uniform hrkd meta_scorer_gold" bash reproduce.sh amazon study
study() {
  local noisy=${NOISY_DOMAIN:-${LAST_DOMAIN}} flip=${FLIP_PROB:-0.4}
  local root=${OUT_ROOT}/study_${noisy}_p${flip}
  local noise="--noisy_domain ${noisy} --flip_prob ${flip}"
  export MODE=full TEACHER_SEED=${TEACHER_SEED:-42}  # SKIP_FINISHED: e.g. the table's clean runs
  export META_ARGS=${META_ARGS:-"--meta_lr 0.05 --meta_every 1 --meta_data dev"}
  SEEDS=${TEACHER_SEED} OUT_ROOT=${root} EXTRA_ARGS="${EXTRA_ARGS} ${noise}" \
    timed "study: stage 3 on flipped ${noisy} labels" bash train_multi_domain.sh
  OUT_ROOT=${root} EXTRA_ARGS="${EXTRA_ARGS} ${noise}" \
    VARIANTS=${STUDY_VARIANTS:-"uniform hrkd meta_gold meta_scorer_gold"} \
    timed "study: stage 4 with flipped ${noisy} labels" bash finetune_multi_domain.sh
  VARIANTS=${STUDY_CLEAN_VARIANTS-"uniform meta_scorer_gold"} \
    timed "study: stage 4 with every domain clean" bash finetune_multi_domain.sh
  "${PYTHON}" report.py --runs "${root}" --out "${root}/report" --tasks "${TASK}" \
    --study_domain "${noisy}"
  "${PYTHON}" report.py --runs "${OUT_ROOT}" --out "${OUT_ROOT}/report" --tasks "${TASK}" \
    --study_domain "${noisy}"
}

# JOBS > 1 or RAY_ADDRESS (table, fewshot, all): first the step's stage commands as Ray tasks
# through scheduler.py (one run per domain and stage-4 variant, each after its teachers, the
# students of finished teachers first: --order students), JOBS at a time (on a cluster without
# JOBS: as many as its CPUs hold), THREADS threads each (default: the cores over JOBS) and
# GPUS_PER_RUN GPUs each (default 0); logs and schedule.tsv in OUT_ROOT/schedule/. Then the step
# runs as usual: it skips every finished run and adds TF-IDF and the report.
parallel() {  # steps...
  local dir=${OUT_ROOT}/schedule step plans=() cores threads jobs=()
  cores=$(nproc 2> /dev/null || echo 1)
  threads=${THREADS:-$(( JOBS_GIVEN == 1 && cores / JOBS > 0 ? cores / JOBS : 1 ))}
  local modes=${*/table/full}
  left "${modes}"
  mkdir -p "${dir}"
  for step in "$@"; do
    PYTHON=echo JOBS=1 RAY_ADDRESS= bash "$0" "${TASK}" "${step}" > "${dir}/${step}.plan" \
      2> /dev/null
    plans+=("${dir}/${step}.plan")
  done
  local at_a_time="as many processes at a time as the cluster holds"
  if [ "${JOBS_GIVEN}" = 1 ] || [ -z "${RAY_ADDRESS:-}" ]; then
    jobs=(--jobs "${JOBS}")
    at_a_time="${JOBS} processes at a time"
  fi
  echo "== ${at_a_time}, ${threads} thread(s) each" \
       "(scheduler.py on ${RAY_ADDRESS:-a local Ray instance}; logs in ${dir}/logs)"
  if ! "${PYTHON}" scheduler.py "${plans[@]}" --split "${jobs[@]}" --threads "${threads}" \
       --gpus_per_run "${GPUS_PER_RUN:-0}" --order "${ORDER:-students}" --python "${PYTHON}" \
       --root "${OUT_ROOT}" --log_dir "${dir}/logs"; then
    echo "error: some runs failed, were skipped or were stopped (${dir}/logs/schedule.tsv" \
         "names them, each with its log); rerun the same command to continue" >&2
    exit 1
  fi
}

JOBS_GIVEN=${JOBS:+1}
JOBS_GIVEN=${JOBS_GIVEN:-0}
JOBS=${JOBS:-1}
if ! [[ "${JOBS}" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: JOBS=${JOBS}: a number of processes at a time (1 or more)" >&2
  exit 1
fi
if { [ "${JOBS}" -gt 1 ] || [ -n "${RAY_ADDRESS:-}" ]; } && [ "${DRY_RUN}" = 0 ]; then
  case "${STEP}" in
    table|fewshot) parallel "${STEP}" ;;
    all) parallel table fewshot ;;
  esac
fi

case "${STEP}" in
  tune) tune ;;
  tune_labels) tune_labels ;;
  tune_fewshot) tune_fewshot ;;
  tune_fewshot_multi) tune_fewshot_multi ;;
  table) table full ;;
  fewshot) table fewshot ;;
  all) table full; table fewshot ;;
  study) study ;;
  left) left ;;
  deploy) deploy ;;
esac
