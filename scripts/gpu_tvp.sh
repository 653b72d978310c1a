#!/bin/bash
# TVP's GPU runs (docs/tvp.md), phase by phase; each phase fits one 10-minute device call and can be re-run.
#
#   bash scripts/gpu_tvp.sh clip [STEPS]
#        SceneClip, TSE's image-text guide, on clean scene captions (default 2000 steps of 256; ~5 min)
#   bash scripts/gpu_tvp.sh prompts [CKPT] [STEPS]
#        the shifted-domain train images (300) and, in parallel on the one GPU, the prompts trained on CKPT
#        (default models/default_model): TVP (L_LM + FCA - TSE), no-FCA, no-TSE, at the paper's 30 px frame and
#        at a one-patch 14 px frame (default 600 steps of 32 images each); needs the clip phase's guide
#   bash scripts/gpu_tvp.sh finetune [CKPT] [STEPS]
#        the per-model alternative: CKPT's projector fine-tuned on the same 300 images (default 600 steps)
#   bash scripts/gpu_tvp.sh indep [SECONDS] [SEED]
#        an independently trained target: stage 0 of `pipmm train` from scratch with another seed (default 1),
#        sized to SECONDS of training (default 520), plain LLaVA at full budget
#   [PLAIN=DIR] bash scripts/gpu_tvp.sh table [CKPT] [N]
#        scripts/tvp_table.py over every target (source, int8, quarter, plain baseline; seed1 and source-ft when
#        the indep and finetune phases ran) with and without each 30 px prompt, N questions per split (default 2000), ONNX Runtime CPU in 14
#        processes; resumable (bundles and results are kept in $RUNS/table). FRAME=14 scores the 14 px prompts.
#
# Everything stays in $RUNS between calls on one machine; what comes back is in $OUT: small.tar.gz (prompts, the
# guide, logs, table results: untar at the repository root, it holds runs/tvp/...) and the seed-1 weights.
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-/tmp/pipmm-runs/tvp}
OUT=${OUT:-/tmp/pipmm-out}
DEVICE=${DEVICE:-cuda}           # cpu: the same phases at tiny sizes (a smoke run of the whole pipeline)
SCENES=${SCENES:-300}            # shifted-domain train images (prompts and finetune)
SPS=${SPS:-32}                   # images per step (prompts and finetune)
CLIP_BATCH=${CLIP_BATCH:-256}    # SceneClip batch
JOBS=${JOBS:-14}                 # table: ONNX Runtime eval processes
FRAMES=${FRAMES:-30 14}          # prompts: frame widths
P="python3 -m sdk.cli"
mkdir -p "$RUNS" "$OUT"
phase=${1:?phase: clip, prompts, indep or table}

pack() {  # every small file of the TVP runs -> one tar (paths runs/tvp/...); listed weights -> one file each
  mkdir -p runs && ln -sfn "$RUNS" runs/tvp-pack
  tar czhf "$OUT/small.tar.gz" --exclude='model*.safetensors' --exclude='trainer_state-*' --exclude='bundles' \
      --exclude='ckpt-plain' --exclude='shifted-train/images' --transform 's,^runs/tvp-pack,runs/tvp,' runs/tvp-pack/
  rm -f runs/tvp-pack
  for f in "$@"; do [ -f "$RUNS/$f" ] && cp "$RUNS/$f" "$OUT/$(echo "$f" | tr / _)"; done; true
}

case $phase in
clip)
  nvidia-smi -L || true
  $P tvp clip-train --out "$RUNS/clip" --steps "${2:-2000}" --batch-size "$CLIP_BATCH" --device "$DEVICE" --quiet
  pack
  ;;
prompts)
  CKPT=${2:-models/default_model}
  STEPS=${3:-600}
  [ -f "$RUNS/shifted-train/train.json" ] || $P tvp scenes --out "$RUNS/shifted-train" --n "$SCENES" --split train --quiet
  T="$P tvp train --source $CKPT --data $RUNS/shifted-train --clip $RUNS/clip --steps $STEPS --scenes-per-step $SPS --device $DEVICE --quiet --overwrite"
  for frame in $FRAMES; do
    $T --frame $frame --out "$RUNS/prompt-f$frame" > "$RUNS/prompt-f$frame.log" 2>&1 &
    $T --frame $frame --fca-weight 0 --out "$RUNS/prompt-f$frame-nofca" > "$RUNS/prompt-f$frame-nofca.log" 2>&1 &
    $T --frame $frame --tse-weight 0 --out "$RUNS/prompt-f$frame-notse" > "$RUNS/prompt-f$frame-notse.log" 2>&1 &
  done
  wait
  tail -n 2 "$RUNS"/prompt-*.log
  for d in "$RUNS"/prompt-f*/; do tail -n 1 "$d/log.jsonl"; done
  pack
  ;;
finetune)
  CKPT=${2:-models/default_model}
  [ -f "$RUNS/shifted-train/train.json" ] || $P tvp scenes --out "$RUNS/shifted-train" --n "$SCENES" --split train --quiet
  $P tvp finetune --source "$CKPT" --data "$RUNS/shifted-train" --out "$RUNS/ft-source" --steps "${3:-600}" \
     --scenes-per-step "$SPS" --device "$DEVICE" --quiet
  pack ft-source/model.safetensors
  ;;
indep)
  SEED=${3:-1}
  rm -rf "$RUNS/seed$SEED"
  $P train --stage 0 --seed "$SEED" --out "$RUNS/seed$SEED" --steps 1000000 --time-budget "${2:-520}" --warmup 300 \
     --batch-size 256 --lr 1e-3 --save-every 1000000 --log-every 50 --val-scenes 32 --device "$DEVICE" --quiet
  pack "seed$SEED/model.safetensors"
  ;;
table)
  CKPT=${2:-models/default_model}
  F=${FRAME:-30}
  IND=""; [ -f "$RUNS/seed1/model.safetensors" ] && IND="--independent $RUNS/seed1"
  [ -f "$RUNS/ft-source/model.safetensors" ] && IND="$IND --finetuned $RUNS/ft-source"
  python3 scripts/tvp_table.py --source "$CKPT" --plain "${PLAIN:-$CKPT/plain-baseline}" $IND --n "${3:-2000}" \
     --jobs "$JOBS" --out "$RUNS/table-f$F" --json "$RUNS/table-f$F.json" \
     --prompt tvp="$RUNS/prompt-f$F" --prompt no-fca="$RUNS/prompt-f$F-nofca" --prompt no-tse="$RUNS/prompt-f$F-notse"
  pack
  ;;
*)
  echo "unknown phase $phase" >&2; exit 2
  ;;
esac
echo "phase $phase done"
