#!/bin/bash
# TVP's GPU runs (docs/tvp.md). The whole table is three device calls of < 9.5 min each (docs/tvp.md "GPU runs"):
#
#   bash scripts/gpu_tvp.sh train [CKPT]     call 1: the shifted train images, SceneClip, the three 30 px prompts
#                                            (TVP, no-FCA, no-TSE) and the projector fine-tune, overlapped (~7 min)
#   bash scripts/gpu_tvp.sh indep [SECONDS] [SEED]
#                                            call 2: the independently trained target (~8 min at 420 s)
#   bash scripts/gpu_tvp.sh table [CKPT] [N] call 3: scripts/tvp_table.py over every target (~6 min at N=1000)
#
# The single phases, for re-runs:
#   clip [STEPS]             SceneClip, TSE's image-text guide, on clean scene captions (CLIP_STEPS, 256 a step)
#   prompts [CKPT] [STEPS]   the prompts trained on CKPT (default models/default_model) at each frame of FRAMES:
#                            TVP (L_LM + FCA - TSE), no-FCA, no-TSE; needs the clip phase's guide
#   finetune [CKPT] [STEPS]  the per-model alternative: CKPT's projector fine-tuned on the same images
#   indep [SECONDS] [SEED]   stage 0 of `pipmm train` from scratch with another seed (default 1), SECONDS of training
#                            (default 420), plain LLaVA at full budget: no shipped checkpoint is independent (every
#                            one in models/ shares the default model's stage 0 and its vision tower);
#                            INDEP_WORKERS sets its scene workers (default cores - 2), to run it beside `train`
#   [PLAIN=DIR] table [CKPT] [N]
#                            every target (source, int8, quarter, plain baseline; seed1 and source-ft when the indep
#                            and finetune phases ran) with and without each prompt of frame FRAME (30), N questions per
#                            split (default 1000), ONNX Runtime CPU in JOBS processes; resumable (bundles and
#                            per-condition results are kept in $RUNS/table-fFRAME and reused while current)
# GEOMETRY=overlay (train, prompts, table): prompts that add delta on the border band of the full-size image instead
# of shrinking it into a frame (docs/tvp.md); named prompt-fFRAME-overlay*, scored into table-fFRAME-overlay. A
# re-run on a warm machine that has the clip phase's guide: GEOMETRY=overlay LR=1 bash scripts/gpu_tvp.sh prompts,
# then GEOMETRY=overlay bash scripts/gpu_tvp.sh table.
#
# DEVICE=cpu runs the same phases on a CPU (with small SCENES, SPS, CLIP_BATCH, steps and N: a smoke run).
# Everything lives in $RUNS (default runs/tvp in the tree, so that a later call can carry it). What comes back in
# $OUT: small.tar.gz (every small file: prompts, guide, logs, table JSONs; untar at the repository root, it holds
# runs/tvp/...) and weights-PHASE.tar (checkpoint weights, same layout). A phase stops its work BUDGET seconds
# (default 540) after it started and still packs what it has.
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
BEGIN=$SECONDS
RUNS=${RUNS:-runs/tvp}
OUT=${OUT:-/tmp/pipmm-out}
DEVICE=${DEVICE:-cuda}           # cpu: a smoke run of the whole pipeline
SCENES=${SCENES:-300}            # shifted-domain train images (prompts and finetune)
SPS=${SPS:-16}                   # images per step (prompts and finetune), each with all its ~8 questions
STEPS=${STEPS:-400}              # prompt and finetune steps
CLIP_STEPS=${CLIP_STEPS:-800}
CLIP_BATCH=${CLIP_BATCH:-256}
CLIP_WORKERS=${CLIP_WORKERS:-}   # default: clip-train's (cores - 2, at most 14); `train` leaves cores to the rest
JOBS=${JOBS:-15}                 # table: ONNX Runtime eval processes (and concurrent exports)
FRAMES=${FRAMES:-30}             # prompts: frame widths (30: the paper's; add 14 for a one-patch frame)
FRAME=${FRAME:-30}               # table: the frame whose prompts it scores
GEOMETRY=${GEOMETRY:-pad}        # prompts and table: pad (TVP's: shrink + frame) or overlay (full image, band added)
LR=${LR:-10}                     # prompts: the step on the normalised gradient (TVP's 10; overlay wants less)
G=$([ "$GEOMETRY" = pad ] || echo "-$GEOMETRY")  # name tag: prompt-f30 (pad), prompt-f30-overlay, table-f30-overlay
BUDGET=${BUDGET:-540}
P="python3 -m sdk.cli"
mkdir -p "$RUNS" "$OUT"
RUNS=$(cd "$RUNS" && pwd)
phase=${1:?phase: train, indep, table (or clip, prompts, finetune)}

left() { echo $(( BUDGET - (SECONDS - BEGIN) - ${1:-20} )); }  # seconds left, less a margin for packing
guard() { local s; s=$(left "${GUARD_MARGIN:-20}"); [ "$s" -gt 5 ] || s=5; timeout --signal=INT --kill-after=15 "$s" "$@"; }

has_weights() {  # DIR: a checkpoint's weights are there, one file or shards (m20's model-0000k-of-0000n)
  compgen -G "$1/model*.safetensors" > /dev/null
}

pack() {  # every small file of $RUNS -> small.tar.gz (paths runs/tvp/...); listed weights -> weights-$phase.tar
  local top
  top=$(mktemp -d)
  mkdir -p "$top/runs" && ln -s "$RUNS" "$top/runs/tvp"
  tar czhf "$OUT/small.tar.gz" -C "$top" --exclude='model*.safetensors' --exclude='trainer_state*' \
      --exclude='bundles' --exclude='ckpt-plain' --exclude='shifted-train/images' runs/tvp/
  local have=()
  for f in "$@"; do [ -f "$RUNS/$f" ] && have+=("runs/tvp/$f"); done
  [ ${#have[@]} -eq 0 ] || tar chf "$OUT/weights-$phase.tar" -C "$top" "${have[@]}"
  rm -rf "$top"
  ls -la "$OUT"
}

scenes() {
  [ -f "$RUNS/shifted-train/train.json" ] || $P tvp scenes --out "$RUNS/shifted-train" --n "$SCENES" --split train --quiet
}

clip() {
  guard $P tvp clip-train --out "$RUNS/clip" --steps "${1:-$CLIP_STEPS}" --batch-size "$CLIP_BATCH" --device "$DEVICE" \
     ${CLIP_WORKERS:+--workers "$CLIP_WORKERS"} --quiet
}

prompt() {  # prompt CKPT STEPS FRAME NAME [extra flags]: one prompt, logged to $RUNS/NAME.log
  local ckpt=$1 steps=$2 frame=$3 name=$4
  shift 4
  OMP_NUM_THREADS=${PROMPT_THREADS:-2} guard $P tvp train --source "$ckpt" --data "$RUNS/shifted-train" --clip "$RUNS/clip" \
     --steps "$steps" --scenes-per-step "$SPS" --frame "$frame" --geometry "$GEOMETRY" --lr "$LR" --device "$DEVICE" --quiet --overwrite \
     --out "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
}

finetune() {
  OMP_NUM_THREADS=${PROMPT_THREADS:-2} guard $P tvp finetune --source "$1" --data "$RUNS/shifted-train" --out "$RUNS/ft-source" \
     --steps "$2" --scenes-per-step "$SPS" --device "$DEVICE" --quiet > "$RUNS/ft-source.log" 2>&1
}

serial() { [ "$DEVICE" = cpu ]; }  # on a CPU the concurrent jobs run one after another (one core)

report() {
  for f in "$RUNS"/prompt-*.log "$RUNS"/ft-source.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done
  for d in "$RUNS"/prompt-f*/; do [ -f "$d/log.jsonl" ] && { echo "== $d"; tail -n 1 "$d/log.jsonl"; }; done
  true
}

case $phase in
train)  # clip (CPU-bound: scene drawing) overlaps the no-TSE prompt and the fine-tune (GPU); then TVP and no-FCA
  CKPT=${2:-models/default_model}
  nvidia-smi -L || true
  scenes
  CLIP_WORKERS=${CLIP_WORKERS:-$(( $(nproc) > 6 ? $(nproc) - 5 : 0 ))}
  if serial; then
    clip
    prompt "$CKPT" "$STEPS" "$FRAME" "prompt-f$FRAME$G-notse" --tse-weight 0
    finetune "$CKPT" "$STEPS"
  else
    clip > "$RUNS/clip.log" 2>&1 &
    CLIP_PID=$!
    prompt "$CKPT" "$STEPS" "$FRAME" "prompt-f$FRAME$G-notse" --tse-weight 0 &
    finetune "$CKPT" "$STEPS" &
    wait $CLIP_PID || { echo "clip failed:"; tail -n 5 "$RUNS/clip.log"; }
  fi
  [ -f "$RUNS/clip/clip.json" ] && tail -n 1 "$RUNS/clip.log" 2>/dev/null || true
  prompt "$CKPT" "$STEPS" "$FRAME" "prompt-f$FRAME$G" &
  serial && wait
  prompt "$CKPT" "$STEPS" "$FRAME" "prompt-f$FRAME$G-nofca" --fca-weight 0 &
  wait || true
  report
  pack ft-source/model.safetensors
  ;;
clip)
  nvidia-smi -L || true
  clip "${2:-$CLIP_STEPS}"
  pack
  ;;
prompts)
  CKPT=${2:-models/default_model}
  scenes
  for frame in $FRAMES; do
    prompt "$CKPT" "${3:-$STEPS}" "$frame" "prompt-f$frame$G" &
    serial && wait
    prompt "$CKPT" "${3:-$STEPS}" "$frame" "prompt-f$frame$G-nofca" --fca-weight 0 &
    serial && wait
    prompt "$CKPT" "${3:-$STEPS}" "$frame" "prompt-f$frame$G-notse" --tse-weight 0 &
    serial && wait
  done
  wait || true
  report
  pack
  ;;
finetune)
  CKPT=${2:-models/default_model}
  scenes
  finetune "$CKPT" "${3:-$STEPS}"
  report
  pack ft-source/model.safetensors
  ;;
indep)
  SEED=${3:-1}
  rm -rf "$RUNS/seed$SEED"
  GUARD_MARGIN=10 guard $P train --stage 0 --seed "$SEED" --out "$RUNS/seed$SEED" --steps 1000000 \
     --time-budget "${2:-420}" --warmup 300 --batch-size 256 --lr 1e-3 --save-every 1000000 --log-every 50 \
     --val-scenes 32 --device "$DEVICE" ${INDEP_WORKERS:+--workers "$INDEP_WORKERS"} --quiet
  pack "seed$SEED/model.safetensors"
  ;;
table)
  CKPT=${2:-models/default_model}
  IND=""; has_weights "$RUNS/seed1" && IND="--independent $RUNS/seed1"
  has_weights "$RUNS/ft-source" && IND="$IND --finetuned $RUNS/ft-source"
  status=0
  guard python3 scripts/tvp_table.py --source "$CKPT" --plain "${PLAIN:-$CKPT/plain-baseline}" $IND --n "${3:-1000}" \
     --jobs "$JOBS" --out "$RUNS/table-f$FRAME$G" --json "$RUNS/table-f$FRAME$G.json" \
     --prompt tvp="$RUNS/prompt-f$FRAME$G" --prompt no-fca="$RUNS/prompt-f$FRAME$G-nofca" \
     --prompt no-tse="$RUNS/prompt-f$FRAME$G-notse" || status=$?
  pack
  [ $status -eq 0 ] || { echo "table stopped (status $status): the finished conditions are in small.tar.gz; carry runs/tvp and re-run to finish"; exit $status; }
  ;;
*)
  echo "unknown phase $phase" >&2; exit 2
  ;;
esac
echo "phase $phase done in $(( SECONDS - BEGIN )) s"
