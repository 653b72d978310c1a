#!/usr/bin/env bash
# Stage ONNX Runtime GPU for the GPU machine in parts that fit beside this checkout in one device call.
#
#   bash scripts/stage_ort_gpu.sh [GPU_COMMAND [LATER_COMMAND]]   # from the root of the checkout the calls send
#
# ../shared/device/stage-ort-gpu.sh cuts the wheel (about 256 MB) into 52 MB parts, but every call also sends the
# tracked tree (51 MiB at 2026-12: the default model, its variants and bundle), and a call carries 64 MiB.
# This script cuts the same wheel into parts of (64 MiB - what travels anyway - 1 MiB) and prints one command per part; the last
# one installs it (ort-gpu-env.sh: sha256 check, pip --target /tmp/site, CUDA provider check) and runs
# GPU_COMMAND, then LATER_COMMAND follows in calls of its own (defaults: scripts/referring_gpu.py builds its
# 0.5B-shape checkpoint and bundle, then times). Send the calls back to back: the machine stays warm only about
# 30 s between calls, and a fresh machine needs the parts again from part 0.
set -euo pipefail
ver="${ORT_GPU_VERSION:-1.31.1}"
shared="${SHARED:-../shared}"
root=$(git rev-parse --show-toplevel)
cd "$root"
run="PYTHONUNBUFFERED=1 python3 scripts/referring_gpu.py --preset edge-0.5b --out /tmp/referring-gpu"
command="${1:-$run --build-only}"
later="${2:-$run --json \$OUT/referring-gpu.json}"

travels=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null |
           awk '{s += $1} END {print s + 0}')
limit=$((64 * 1024 * 1024))
part=$((limit - travels - 1024 * 1024))
if [ "$part" -lt $((4 * 1024 * 1024)) ]; then
  echo "the checkout already sends $((travels / 1048576)) MiB of the 64 MiB a call carries: no room for the wheel" >&2
  exit 1
fi

mkdir -p .device/ort
whl=".device/onnxruntime_gpu-${ver}-cp312-cp312-manylinux_2_28_x86_64.whl"
if [ ! -f "$whl" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .device "onnxruntime-gpu==${ver}"
fi
rm -f .device/ort/part.*
split -b "$part" -d -a 2 "$whl" .device/ort/part.
sha256sum "$whl" | cut -d' ' -f1 > .device/ort/SHA256
basename "$whl" > .device/ort/NAME
cp "$shared/device/ort-gpu-env.sh" .device/ort/env.sh
parts=(.device/ort/part.*)
n=${#parts[@]}
echo "staged $(basename "$whl") in $n parts of $((part / 1048576)) MiB under .device/ort/ (the checkout sends $((travels / 1048576)) MiB)"
echo
for i in "${!parts[@]}"; do
  p=${parts[$i]}
  if [ "$i" = 0 ]; then op='>'; else op='>>'; fi
  if [ "$i" = $((n - 1)) ]; then
    echo "  $((i + 1))/$n: carry [\"$p\", \".device/ort/env.sh\", \".device/ort/SHA256\", \".device/ort/NAME\"]"
    echo "        command: cat $p $op /tmp/ort.whl && source .device/ort/env.sh && $command"
  else
    echo "  $((i + 1))/$n: carry [\"$p\"]   command: cat $p $op /tmp/ort.whl"
  fi
done
echo
echo "  then, each its own call: export PYTHONPATH=/tmp/site && $later"
