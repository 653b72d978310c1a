#!/usr/bin/env bash
# A bundle for several frames from a shipped multi-image variant (docs/multi-image.md "The shipped adapter"):
# the variant made whole with its base model's tower (or the base itself when the variant's LLM
# stayed frozen: it ships the adapter alone), exported at the run's own budget and positions (its
# train_config.json), with its adapter graph for N_max frames; one frame is answered from its own tokens, as the
# bundle without the adapter would (SINGLE_FRAME=adapter sends it through the adapter). Needs the [export] extra
# (torch) once; the bundle then runs torch-free.
#
#   bash scripts/export_multi_image_bundle.sh [VARIANT_DIR] [OUT_DIR] [N_MAX]
#       # defaults: models/variants/mivpg mivpg-bundle 8
#   pipmm describe head.png wrist.png rear.png --prompt "Which frame shows the red star?" --bundle mivpg-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-models/variants/mivpg}"
out="${2:-mivpg-bundle}"
n_max="${3:-8}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f "$variant/adapter.json" ] || { echo "$variant has no adapter.json: not a multi-image variant" >&2; exit 2; }
# the model it was trained from: its variant.json's base (the shipped mivpg: models/r11), else the default model
base=$(python -m export.train.state base "$variant")
if [ -f "$variant/without_vision.safetensors" ]; then  # a tuned LLM: made whole with its base's tower
  ckpt="$(mktemp -d)/checkpoint"
  python -m export.train.state assemble "$base" "$variant" "$ckpt" > /dev/null
else  # the LLM stayed frozen: the adapter runs beside its base itself
  ckpt=$base
fi
# one frame from its own tokens: 62.4 % of 500 single-frame test questions against 52.2 % through the adapter
# (the shipped mivpg variant, docs/multi-image.md)
single=${SINGLE_FRAME:-own}
read -r budget positions < <(python -c "import json; c = json.load(open('$variant/train_config.json')); print(c['budget'], c['positions'])")
python -m sdk.cli export "$ckpt" --prompt-mlp "$ckpt" --visual-tokens "$budget" --reducer prompt-topk \
  --visual-positions "$positions" --out "$out" --overwrite --quiet
python -m sdk.cli add-graphs "$out" --adapter "$variant" --n-max "$n_max" --single-frame "$single" --overwrite
echo "wrote $out: pipmm describe A.png B.png --prompt '...' --bundle $out"
