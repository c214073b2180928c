#!/usr/bin/env bash
# The GPU checks in one script (run on a CUDA machine from the repository root):
#   1. every stage trains a few steps on the generated sample with bf16 (fp16 for stage 4 too),
#      then tests, through the real scripts;
#   2. bench.py at the demo, real (MiniLM) and paper sizes, fp32 and bf16 (the straightforward
#      HRKD step always fp32), the compiled HRKD step (--compile, CUDA graphs) and the one-GPU
#      paper batch (32 per domain), JSON into $OUT (default bench_out/).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-bench_out}
PY=${PYTHON:-python3}
mkdir -p "${OUT}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "${OUT}/gpu.txt"
${PY} -c "import torch; print('torch', torch.__version__)" | tee -a "${OUT}/gpu.txt"

SAMPLE=$(mktemp -d)/sample
RUNS=$(dirname "${SAMPLE}")/runs
${PY} sample_corpus.py --out "${SAMPLE}" --size tiny > /dev/null
common="--task amazon --data_dir ${SAMPLE}/amazon --max_seq_length 32 --batch_size 8
        --max_steps 6 --val_freq 3 --no_progress --do_train --do_test"
${PY} train_domain.py ${common} --domain books --vocab_file "${SAMPLE}/vocab.txt" \
  --model_config tiny_teacher --amp bf16 --output_dir "${RUNS}/s1"
${PY} finetune_domain.py ${common} --domain books --teacher_dir "${RUNS}/s1" \
  --student_config tiny_student --amp bf16 --output_dir "${RUNS}/s2"
${PY} train_multi_domain.py ${common} --domain books --vocab_file "${SAMPLE}/vocab.txt" \
  --model_config tiny_teacher --amp bf16 --output_dir "${RUNS}/s3"
for amp in bf16 fp16; do
  ${PY} finetune_multi_domain.py ${common} --domain books --teacher_dir "${RUNS}/s3" \
    --student_config tiny_student --amp "${amp}" --output_dir "${RUNS}/s4_${amp}"
done
${PY} finetune_multi_domain.py ${common} --domain books --teacher_dir "${RUNS}/s3" \
  --student_config tiny_student --amp bf16 --domain_weighting meta --output_dir "${RUNS}/s4_meta"
echo "stages ok" | tee -a "${OUT}/gpu.txt"

${PY} bench.py --preset tiny --device cuda --amp off --steps 20 --warmup 5 --out "${OUT}/gpu_tiny_fp32.json"
${PY} bench.py --preset tiny --device cuda --amp bf16 --steps 20 --warmup 5 --out "${OUT}/gpu_tiny_bf16.json"
${PY} bench.py --preset paper --device cuda --amp off --steps 10 --warmup 3 --out "${OUT}/gpu_paper_fp32.json"
${PY} bench.py --preset paper --device cuda --amp bf16 --steps 10 --warmup 3 --profile \
  --out "${OUT}/gpu_paper_bf16.json"
${PY} bench.py --preset real --device cuda --amp bf16 --steps 20 --warmup 5 --compile \
  --out "${OUT}/gpu_real_bf16.json"
${PY} bench.py --preset paper --device cuda --amp bf16 --steps 10 --warmup 5 --compile \
  --compile_mode reduce-overhead --cases train --out "${OUT}/gpu_paper_bf16_compiled.json"
${PY} bench.py --preset paper --device cuda --amp bf16 --batch 32 --steps 10 --warmup 5 \
  --compile --compile_mode reduce-overhead --cases train --out "${OUT}/gpu_paper_bf16_b32.json"
