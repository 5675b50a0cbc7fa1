#!/usr/bin/env bash
# The GPU benchmark rows in one short run (about 6 minutes on one H100), from the repository root:
#   1. bench_generation: SD 2.1-base layout, 512 px, fp16, batch 1 and 8, 20 DDIM steps, plain diffusers
#      vs dsdiff; then channels-last at batch 8 and dsdiff alone at batch 16 and 32;
#   2. bench_train: DeepLabV3 R101 (voc preset) and the demo's DeepLabV3+ R18 (shapes preset),
#      Lightning vs a bare loop, fp32 and bf16-mixed, then bf16-mixed channels-last;
#   3. if time is left: torch.compile of the UNet at batch 1 (plain and with the recorders).
# Tables, JSON and logs go to $OUT (default /tmp/gpu_bench_out). Wheels the GPU image lacks
# (diffusers, segmentation-models-pytorch, hydra-core, omegaconf, antlr4) are carried in .whl/.
#   run: bash experiments/gpu_bench.sh      (carry: [".whl"])
#   ONLY=recording bash experiments/gpu_bench.sh: only bench_generation at batch 1 and 8 with the
#   "plain + recorders" row and torch.profiler tables (about 90 s)
#   ONLY=mmdit bash experiments/gpu_bench.sh: the SD3.5-Medium and FLUX.1 layouts at full width, 1024 px,
#   bf16, batch 1 and 4, plain diffusers vs dsdiff's recording (every block, then a middle range), and the
#   UNet recorders at batch 8 (about 5 minutes; FLUX.1's 12B parameters at random weights need ~24 GB)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_bench_out}
BUDGET=${BUDGET:-390}   # seconds for everything; the compile stage gets what is left
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep --line-buffered -v "WARNING: Target directory" | tail -3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
echo "== setup $((SECONDS - start)) s"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import sys, torch, diffusers, transformers, lightning, segmentation_models_pytorch as smp, hydra
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| diffusers', diffusers.__version__,
      '| transformers', transformers.__version__, '| lightning', lightning.__version__, '| smp', smp.__version__, '| hydra', hydra.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

GEN=(experiments/bench_generation.py --arch sd21 --device "$DEVICE")
[ "$DEVICE" = cuda ] && GEN+=(--dtype fp16) || GEN+=(--image-size 128 --sizes 256)   # (CPU: a logic check only)

if [ "${ONLY:-}" = recording ]; then  # a short re-measure: where the recording's extra time goes
  echo "== bench_generation: plain vs plain + recorders vs dsdiff, with profiles (left $(left) s)"
  timeout $(( $(left) > 150 ? 150 : $(left) )) $PY "${GEN[@]}" --batch 1 8 --steps "${STEPS:-20}" --repeats 3 --decompose \
    --profile "$OUT/profile" --sizes 1024 --out "$OUT/bench_generation_recording.md" --json "$OUT/bench_generation_recording.json" \
    2>&1 | grep --line-buffered -v "should be kept in float32" | tee "$OUT/bench_generation_recording.log"
  echo "== done in $((SECONDS - start)) s (exit ${PIPESTATUS[0]})"
  exit 0
fi

if [ "${ONLY:-}" = mmdit ]; then
  for family in sd3 flux; do
    echo "== bench_mmdit --family $family (left $(left) s)"
    MM=(experiments/bench_mmdit.py --family "$family" --device "$DEVICE")
    [ "$DEVICE" = cuda ] && MM+=(--dtype bf16 --image-size 1024 --batch 1 4) || MM+=(--image-size 256 --repeats 1)
    timeout $(( $(left) > 150 ? 150 : $(left) )) $PY "${MM[@]}" --out "$OUT/mmdit" 2>&1 \
      | grep --line-buffered -v "should be kept in float32" | tee "$OUT/bench_mmdit_$family.log"
  done
  echo "== bench_generation: the UNet recorders at batch 8 (left $(left) s)"
  timeout $(( $(left) > 120 ? 120 : $(left) )) $PY "${GEN[@]}" --batch 8 --steps "${STEPS:-20}" --repeats 3 \
    --out "$OUT/bench_generation_b8.md" 2>&1 | grep --line-buffered -v "should be kept in float32" | tee "$OUT/bench_generation_b8.log"
  echo "== done in $((SECONDS - start)) s"
  exit 0
fi

echo "== 1. bench_generation (left $(left) s)"
timeout $(( $(left) > 200 ? 200 : $(left) )) $PY "${GEN[@]}" --batch 1 8 --steps "${STEPS:-20}" --repeats 3 \
  --channels-last --probe-batches 16 32 --out "$OUT/bench_generation_sd21.md" --json "$OUT/bench_generation_sd21.json" \
  2>&1 | grep --line-buffered -v "should be kept in float32" | tee "$OUT/bench_generation.log"
echo "   exit ${PIPESTATUS[0]}"

echo "== 2. bench_train (left $(left) s)"
TRAIN=(experiments/bench_train.py --device "$DEVICE" --preset voc shapes --channels-last)
[ "$DEVICE" = cuda ] && TRAIN+=(--precision 32-true bf16-mixed --steps 15) || TRAIN+=(--crop 64 --batch 2 --steps 2)
timeout $(( $(left) > 150 ? 150 : $(left) )) $PY "${TRAIN[@]}" --warmup 5 --out "$OUT/bench_train.md" --json "$OUT/bench_train.json" \
  2>&1 | grep --line-buffered -v -E "LitLogger|litlogger|LeafSpec|Tensor Cores|available: |LOCAL_RANK|log_every_n_steps" | tee "$OUT/bench_train.log"
echo "   exit ${PIPESTATUS[0]}"

echo "== 3. torch.compile (left $(left) s)"
if [ "$(left)" -gt 90 ]; then
  timeout "$(left)" $PY "${GEN[@]}" --batch 1 --steps "${STEPS:-20}" --repeats 3 --compile \
    --out "$OUT/bench_generation_compile.md" --json "$OUT/bench_generation_compile.json" \
    2>&1 | grep --line-buffered -v "should be kept in float32" | tee "$OUT/bench_generation_compile.log"
  echo "   exit ${PIPESTATUS[0]}"
else
  echo "   skipped: too little time left" | tee "$OUT/bench_generation_compile.log"
fi
echo "== done in $((SECONDS - start)) s; files in $OUT:"
ls -la "$OUT"
