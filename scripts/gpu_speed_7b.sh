#!/bin/bash
# Issue 18's 7B run (scripts/gpu_speed.py at llava-1.5-7b shapes), one device call per step, sent back to back
# (the machine stays warm only about 30 s between calls); the plan, the estimates and what to do when a call
# stops early are in docs/gpu.md ("The 7B run"):
#
#   bash scripts/gpu_speed_7b.sh checkpoint   ~45 s   random FP16 checkpoint built on the GPU (torch only: can share
#                                                     the call of an onnxruntime-gpu staging part)
#   bash scripts/gpu_speed_7b.sh float        ~390 s  the plain FP16 bundle (vision, embed, decoder)
#   bash scripts/gpu_speed_7b.sh fused        ~300 s  decoder_fused FP16 and the INT4 copy, in parallel (~100 GB RAM)
#   bash scripts/gpu_speed_7b.sh genai        ~270 s  the text model, then GenAI's fp16 and int4 builds; ckpt/ and
#                                                     text/ deleted once nothing needs them (disk: 64 GB)
#   bash scripts/gpu_speed_7b.sh time         ~280 s  fused, genai, fused-int4, genai-int4, 2 rounds -> $OUT JSON + .md
#   bash scripts/gpu_speed_7b.sh fused-only|int4      one of the fused step's two stages alone (after a memory kill)
#
# Every step but checkpoint needs onnxruntime-gpu in /tmp/site and onnxruntime-genai-cuda in /tmp/genai
# (../shared/device/README.md). A step repeated after a kill resumes: finished stages are skipped.
# PRESET=llava-1.5-7b-2l DEVICE=cpu runs the same steps here (FP32, 7B widths, 2 layers): a check of the calls.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:/tmp/genai${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/speed-out}
mkdir -p "$out"
run() {  # SECONDS, then gpu_speed.py's arguments; --budget-s leaves the call 20 s to write its JSON
  local limit=$1; shift
  timeout "$limit" python3 scripts/gpu_speed.py --preset "${PRESET:-llava-1.5-7b}" --device "${DEVICE:-cuda}" \
    --work "${WORK:-/tmp/speed}" --budget-s $((limit - 20)) "$@"
}
case "${1:-}" in
  checkpoint) run 150 --export checkpoint --rounds 0 --out "$out/7b-checkpoint.json" ;;
  float) run 590 --export float --rounds 0 --out "$out/7b-float.json" ;;
  fused) run 590 --export fused+int4 --prune --rounds 0 --out "$out/7b-fused.json" ;;
  fused-only) run 590 --export fused --prune --rounds 0 --out "$out/7b-fused-only.json" ;;
  int4) run 590 --export int4 --prune --rounds 0 --out "$out/7b-int4.json" ;;
  genai) run 590 --export "text;genai" --prune --rounds 0 --out "$out/7b-genai.json" ;;
  time) run 590 --export none --variants "${VARIANTS:-fused,genai,fused-int4,genai-int4}" --budget-s 500 \
          --out "$out/speed-llava-1.5-7b.json" ;;
  *) echo "usage: bash scripts/gpu_speed_7b.sh checkpoint|float|fused|genai|time (or fused-only, int4)" >&2; exit 2 ;;
esac
status=$?
df -h /tmp | tail -1
exit $status
