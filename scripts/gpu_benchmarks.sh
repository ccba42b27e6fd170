#!/usr/bin/env bash
# The project's GPU work on one GPU, inside one command of under ten minutes (DEADLINE seconds):
#   1. generate and cache ShapesWorld scenes in the background, on spare cores at low priority;
#   2. meanwhile, XL/2 train-step benchmarks against diffusers: BENCH=short (default: 256/512 px, ours vs diffusers,
#      about a minute), BENCH=full (also torch.compile with a kernel profile, 1024 multi-scale and the ShapesWorld
#      model's step: about four minutes; measured on an H200 on 2026-11-27), BENCH=none;
#   3. a ShapesWorld stage-2 restart from INIT (default: the shipped demo) with text encoder T5 (default
#      builtin:shapes-t5) for the time left: a short probe run measures the images/s, which sets the step count so
#      that the cosine decay ends inside the deadline.
#      DEADLINE=555 SCENES=100000 BATCH=512 BENCH=short bash scripts/gpu_benchmarks.sh
#      INIT=$PWD/.gl/ft-ema T5=builtin:shapes-t5-roles BENCH=none bash scripts/gpu_benchmarks.sh   # .gl/ft-ema: weights
# Installs any wheels in .whl/ first (for a machine without network that lacks diffusers or importlib_metadata) and
# writes its results to $OUT (default /tmp/out): bench.log, train.log, metrics.jsonl, and the EMA weights (fp16) of
# the last and the middle checkpoint.
set -u
OUT=${OUT:-/tmp/out}
REPO=$(pwd)
DEADLINE=${DEADLINE:-560}
BATCH=${BATCH:-512}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, pixart_cli, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

RECIPE=$REPO/recipes/shapes/stage2.yaml
DATA=(--set data.path=/tmp/shapes/manifest.jsonl --set data.cache=/tmp/shapes-cache
      --set "data.shapes.n=${SCENES:-100000}" --set data.shapes.workers=12 --set "data.text_encoder=${T5:-builtin:shapes-t5}")

# 1. Scenes and their caption features, beside the benchmarks (which need one core each).
(cd /tmp && nice -n 19 python3 -m pixart_cli prepare "$RECIPE" "${DATA[@]}" --batch-size 1024 --workers 8 \
  > /tmp/prepare.log 2>&1; echo "prepare exited $? at ${SECONDS} s" >> /tmp/prepare.log) &
prep=$!

# 2. Benchmarks (SKIP_BENCH=1 or BENCH=none: none, e.g. to try the rest on a CPU).
BENCH=${BENCH:-short}
[ -n "${SKIP_BENCH:-}" ] && BENCH=none
case "$BENCH" in
  short)
    timeout 120 python3 benchmarks/train_step.py --preset xl --iters 5 --warmup 2 2>&1 | grep -v USDT \
      | tee "$OUT/bench.log" ;;
  full)
    timeout 160 python3 benchmarks/train_step.py --preset xl --iters 4 --warmup 2 --compile --profile 2>&1 \
      | grep -v USDT | tee "$OUT/bench.log"
    timeout 90 python3 benchmarks/train_step.py --preset xl-1024 --iters 3 --warmup 2 --compile 2>&1 \
      | grep -v USDT | tee -a "$OUT/bench.log" ;;
esac
wait $prep
tail -n 3 /tmp/prepare.log | tee "$OUT/train.log"
[ "$BENCH" = full ] && timeout 40 python3 benchmarks/train_step.py --preset shapes --batch "$BATCH" --iters 6 \
  --warmup 2 --profile 2>&1 | grep -v USDT | tee -a "$OUT/bench.log"

# 3. ShapesWorld restart from the shipped demo.
cd /tmp
TRAIN=(--set "model.init=${INIT:-builtin:shapes-demo}" --set optim.lr=1e-3 --set optim.warmup_steps=200
       --set train.timesteps=uniform --set "train.seed=${SEED:-2}" --set "train.batch_size=$BATCH"
       --set data.num_workers=8 --set log.every=100 --set log.sample_every=0)
timeout 80 python3 -m pixart_cli train "$RECIPE" "${DATA[@]}" "${TRAIN[@]}" --set "train.steps=${PROBE_STEPS:-400}" \
  --set output.dir=/tmp/probe --set output.save_every=100000 > /tmp/probe.log 2>&1
rate=$(python3 -c "import json; print(json.loads(open('/tmp/probe/metrics.jsonl').readlines()[-1])['images_per_s'])" \
  2>/dev/null || echo 3000)
left=$((DEADLINE - SECONDS - 40))
if [ "$left" -lt 60 ]; then
  echo "only $left s left before the deadline: no training" | tee -a "$OUT/train.log"
  exit 0
fi
steps=$(python3 -c "print(max(200, int($rate * $left * 0.88 / $BATCH) // 100 * 100))")
echo "probe: $rate img/s; $left s left -> $steps steps of $BATCH" | tee -a "$OUT/train.log"
timeout -s TERM "$left" python3 -m pixart_cli train "$RECIPE" "${DATA[@]}" "${TRAIN[@]}" --set "train.steps=$steps" \
  --set output.dir=/tmp/run --set "output.save_every=$((steps / 4))" --set output.keep_last=8 > /tmp/train.log 2>&1
echo "training exited $? at ${SECONDS} s" | tee -a "$OUT/train.log"
grep -v "^train " /tmp/train.log | tail -n 12 >> "$OUT/train.log"
cp /tmp/run/metrics.jsonl "$OUT/" 2>/dev/null
python3 -m pixart_cli convert /tmp/run -o "$OUT/demo" --ema --dtype fp16 2>&1 | tail -n 2
middle=$(ls -d /tmp/run/checkpoints/step-* 2>/dev/null | sort | tail -n 3 | head -n 1)
[ -n "$middle" ] && python3 -m pixart_cli convert "$middle" -o "$OUT/middle" --ema --dtype fp16 2>&1 | tail -n 2
echo "done at ${SECONDS} s"
exit 0
