#!/usr/bin/env bash
# One GPU session's work, as run on a lent H100 (device tool): train the ShapesWorld demo model for a fixed
# wall-clock budget, export its EMA weights, then benchmark XL/2 training steps against diffusers.
#   TRAIN_SECONDS=240 BENCH_SECONDS=130 bash scripts/gpu_session.sh
# Expects wheels for packages the machine lacks in .whl/ and writes what should come back to $OUT.
set -u
OUT=${OUT:-/tmp/out}
REPO=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, pixart_cli, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

# 1. ShapesWorld demo: stage 2 in miniature, stopped by SIGTERM after TRAIN_SECONDS (a checkpoint is saved then).
mkdir -p /tmp/work && cd /tmp/work
start=$(date +%s)
timeout -s TERM "${TRAIN_SECONDS:-240}" python3 -m pixart_cli train "$REPO/recipes/shapes/stage2.yaml" \
  --set output.dir=/tmp/run --set data.path=/tmp/data/manifest.jsonl --set data.shapes.workers=16 \
  --set data.num_workers=8 --set train.batch_size=512 --set optim.lr=4e-4 --set train.steps=40000 \
  --set output.save_every=2000 --set log.every=200 > /tmp/train.log 2>&1
echo "training exited $? after $(( $(date +%s) - start )) s"
grep -v "^train " /tmp/train.log | tail -n 8
tail -n 3 /tmp/run/metrics.jsonl
python3 -m pixart_cli convert /tmp/run -o "$OUT/demo" --ema --dtype fp16 2>&1 | tail -n 2
cp /tmp/run/metrics.jsonl /tmp/run/loss.png "$OUT/" 2>/dev/null
cd "$REPO"

# 2. XL/2 train step, ours vs diffusers (bf16 autocast), then the largest 512-px batch with checkpointing.
timeout "${BENCH_SECONDS:-130}" python3 benchmarks/train_step.py --preset xl --iters 5 --warmup 2
timeout 70 python3 benchmarks/max_batch.py
exit 0
