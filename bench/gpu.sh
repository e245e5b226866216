#!/usr/bin/env bash
# GPU figures in ONE call of at most ~8 minutes on the `device` machine (H200; python3.12, torch 2.11,
# transformers 5.17, accelerate, peft; no network).  Run from the repository root:
#
#     bash bench/gpu.sh            # on the device (CUDA)
#     DRY=1 bash bench/gpu.sh      # CPU dry run with tiny shapes (what CI / a laptop can check)
#
# Extra wheels latentx needs beyond that image go in bench/wheels/ (git-ignored, < 64 MiB; fill it with
#   pip download --no-deps -d bench/wheels <package>   on a machine with network) and are installed offline.
# Builds Qwen2.5-0.5B- and 1.5B-shaped policies from their published shapes with random weights (no download),
# forces every response to 1024 tokens, and prints bench/dynamics.py and bench/train_overhead.py tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d bench/wheels ] && ls bench/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --find-links bench/wheels bench/wheels/*.whl || true
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [ "${DRY:-0}" = 1 ]; then
  SHAPES="tiny-dry"; LEN=16; STEPS=1; REPEATS=1
  ROLL="--set rollout.prompts_per_step=2 --set rollout.samples_per_prompt=2 --set rollout.micro_batch_size=4"
  DYN="--quick"
else
  SHAPES="0.5b 1.5b"; LEN=1024; STEPS=2; REPEATS=2
  ROLL="--set rollout.prompts_per_step=8 --set rollout.samples_per_prompt=8 --set rollout.micro_batch_size=16 --set model.dtype=bfloat16"
  DYN="--device cuda"
fi
echo "== bench/dynamics.py"
timeout 120 $PY bench/dynamics.py $DYN || echo "(bench/dynamics.py did not finish in its 120 s share)"
for shape in $SHAPES; do
  echo "== bench/train_overhead.py --shape $shape --force-length $LEN"
  timeout 170 $PY bench/train_overhead.py --shape "$shape" --force-length "$LEN" --steps "$STEPS" --warmup 1 \
    --repeats "$REPEATS" --objectives grpo,relax,relax-quantile,verl $ROLL || echo "(shape $shape did not finish in 170 s)"
done
