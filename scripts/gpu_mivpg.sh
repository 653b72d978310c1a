#!/bin/bash
# Multi-image (issue 16) GPU runs, phase by phase; each phase fits one 10-minute device call, in this order:
#
#   bash scripts/gpu_mivpg.sh train [SECONDS]        stage mv for every row of $ROWS at once (one GPU, small models),
#                                                    each stopping with a resumable state after SECONDS (default 480)
#   bash scripts/gpu_mivpg.sh resume [SECONDS]       continue the rows that stopped early (same warm machine)
#   bash scripts/gpu_mivpg.sh export                 bundles at each run's own budget and positions (as trained:
#                                                    train_config.json "budget", "positions", "n_max"), prompt-topk,
#                                                    + the adapter (N_max 8) or concat's section (N_max 4)
#   bash scripts/gpu_mivpg.sh eval [FRAMES]          pipmm eval --multiview at FRAMES (default 4) frames, $EVAL_N (2000)
#                                                    test questions per row, 14 processes (ONNX Runtime CPU, the user path)
#   bash scripts/gpu_mivpg.sh finish [FRAMES]        export + eval + the mivpg row's single-frame check, one call
#   bash scripts/gpu_mivpg.sh single                 the mivpg row's single-frame benchmark (scenes.py families, 2000)
#   PYTHONPATH=/tmp/site bash scripts/gpu_mivpg.sh latency
#                                                    TTFT / memory at edge-0.5b shapes, random weights, 1-8 frames,
#                                                    on the GPU (needs onnxruntime-gpu staged: shared/device/README.md)
#
# Rows ($ROWS, default all): concat, qformer, mivpg (frame order embedded, so "which frame" and "compare" are
# answerable), mivpg-inv (order ignored: permutation invariant), mivpg-full (CSA over all instances, not induced),
# mivpg-fr / qformer-fr (shortcut=frame_regions: each frame's own slots pool its own regions, so frame identity
# does not have to come from the adapter stream; export/model/frame_shortcut.py), mivpg-full-fr (both),
# mivpg-frozen-fr (frozen LLM, frame_regions), mivpg-plain (PIP-MM off: the plain baseline's tower, pool reducer),
# mivpg-frozen (the LLM frozen too: only the adapter trains, so it ships as a few-MB file beside the default
# model). All start from the shipped default model
# with the vision tower, projector and prompt MLP frozen and (except mivpg-frozen) the LLM lightly tuned
# (--train-llm), on 2-4 frames (and a quarter of one-frame batches); every choice lands in train_config.json.
# Budget and positions: the init model's own (half, patch) where N_max frames fit its context, else the next
# setting that does (export/train/frame_setting.py, recorded as train_config.json "visual_setting"): on the default
# model (context 512) the adapters keep half/patch (R + the question) and concat at N_max 4 takes quarter/sequence
# (4 x 256 patch positions, or 4 x 128 tokens, do not fit beside the question).
#
# The shipped variant's call (2026-12-03; 4 rows, 497 s). The tracked tree is 65.6 MiB and a call carries 64: for
# the call, `rm -rf models/variants sdk/default_bundle` (not read here), then `git checkout -- models sdk/default_bundle`:
#   ROWS="mivpg-fr qformer-fr mivpg-full-fr mivpg-frozen-fr" SHIP=mivpg-fr bash scripts/gpu_mivpg.sh train 390 && \
#   ROWS="mivpg-fr qformer-fr mivpg-full-fr mivpg-frozen-fr" SHIP=mivpg-fr bash scripts/gpu_mivpg.sh finish 4
# (train and finish in one command: the machine is given back 30 s after a call, and /tmp with it).
# Recipe (export/train/multiframe.py DEFAULTS): adapter lr 1e-4 (1e-3 collapsed the pooled tokens to one
# input-free vector: docs/multi-image.md), LLM at the same lr (--llm-lr-scale 1), the adapter's output calibrated
# to the projector tokens' statistics before step 1, and adapter settings positions=patch shortcut=frame_regions:
# each token's patch position, and each present frame's own slots starting as its region means (the 2026-12-02
# runs without them answered one frame's colour at 0.30; shortcut=regions, one table over all frames, left "which
# frame" at chance: docs/multi-image.md); the first runs' adapters are --adapter-set positions=none --adapter-set
# shortcut=none. log.jsonl has the loss, each part's gradient norm and the "spread" of the pooled tokens between
# questions (~1 healthy, ~0 collapsed).
# Results go to $OUT (what comes back: at most 8 files, each < 16 MiB): small.tar.gz (configs, log.jsonl and the
# stdout logs of every row, eval JSONs; no weights), and the mivpg row's model.safetensors + adapter (to ship as
# models/variants/mivpg).
# Then, on the CPU machine: python scripts/mivpg_table.py table --latency docs/multi-image-results/latency-cpu.json \
#   --accuracy concat=eval-concat-4f.json qformer=eval-qformer-4f.json mivpg=eval-mivpg-4f.json ... --out ...
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-/tmp/pipmm-runs-mv}
OUT=${OUT:-/tmp/pipmm-out}
ROWS=${ROWS:-"concat qformer mivpg mivpg-inv mivpg-full mivpg-plain mivpg-frozen"}
CLI="python3 -m sdk.cli"
mkdir -p "$RUNS" "$OUT"
phase=${1:?phase: train, resume, export, eval, single or latency}
rows=($ROWS)
workers=$(( 14 / ${#rows[@]} )); [ "$workers" -lt 1 ] && workers=1
EVAL_N=${EVAL_N:-2000}
SHIP=${SHIP:-mivpg}  # the row whose weights come back and whose single-frame families are checked

flags() {  # the stage-mv flags of a row
  local frozen="--stage mv --frames 2 4 --steps ${STEPS:-2000} --batch-size 64
                --lr 1e-4 --llm-lr-scale 1 --save-every 1000000 --log-every 25 --val-scenes 64 --quiet
                --workers $workers"
  local common="$frozen --train-llm"
  case $1 in
    concat)      echo "$common --adapter concat --n-max 4 --init models/default_model" ;;
    qformer)     echo "$common --n-max 8 --adapter qformer --adapter-set frame_order=embedded --init models/default_model" ;;
    mivpg)       echo "$common --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --init models/default_model" ;;
    mivpg-fr)    echo "$common --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --adapter-set shortcut=frame_regions --init models/default_model" ;;
    qformer-fr)  echo "$common --n-max 8 --adapter qformer --adapter-set frame_order=embedded --adapter-set shortcut=frame_regions --init models/default_model" ;;
    mivpg-full-fr) echo "$common --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --adapter-set csa=full --adapter-set shortcut=frame_regions --init models/default_model" ;;
    mivpg-frozen-fr) echo "$frozen --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --adapter-set shortcut=frame_regions --init models/default_model" ;;
    mivpg-inv)   echo "$common --n-max 8 --adapter mivpg --init models/default_model" ;;
    mivpg-full)  echo "$common --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --adapter-set csa=full --init models/default_model" ;;
    mivpg-plain) echo "$common --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --reducer pool --init $RUNS/plain" ;;
    mivpg-frozen) echo "$frozen --n-max 8 --adapter mivpg --adapter-set frame_order=embedded --init models/default_model" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

pack() {  # small files of every run -> one tar; listed files -> one file each
  # adapters (10 MB each in fp32) stay out of the tar, which must come back under 16 MiB; the listed ones travel alone
  (cd "$RUNS" && tar czf "$OUT/small.tar.gz" --exclude='*.safetensors' --exclude='trainer_state-*' \
      --exclude='*.onnx*' --exclude='*/tokenizer.json' --exclude='latency/*' */ *.json *.log 2>/dev/null) || true
  ls -la "$OUT"
  for f in "$@"; do [ -f "$RUNS/$f" ] && cp "$RUNS/$f" "$OUT/$(echo "$f" | tr / _)"; done; true
}

case $phase in
train|resume)
  nvidia-smi -L || true
  if [[ " ${rows[*]} " == *" mivpg-plain "* ]] && [ ! -f "$RUNS/plain/model.safetensors" ]; then
    python3 -m export.train.state assemble models/default_model models/default_model/plain-baseline "$RUNS/plain" > /dev/null
  fi
  for row in "${rows[@]}"; do
    if [ "$phase" = resume ]; then
      [ -f "$RUNS/mv-$row/trainer_state.json" ] || continue
      python3 -c "import json,sys; c=json.load(open('$RUNS/mv-$row/train_config.json')); sys.exit(c['completed_steps'] < c['steps'])" && continue
      extra="--resume"
    else
      rm -rf "$RUNS/mv-$row"; extra=""
    fi
    $CLI train $(flags "$row") --out "$RUNS/mv-$row" --stop-after-seconds "${2:-480}" $extra > "$RUNS/train-$row.log" 2>&1 &
  done
  wait
  tail -n 3 "$RUNS"/train-*.log
  pack mv-$SHIP/model.safetensors mv-$SHIP/adapter.safetensors mv-mivpg-frozen/adapter.safetensors \
       mv-mivpg-frozen-fr/adapter.safetensors
  ;;
export|eval|finish)
  if [ "$phase" != eval ]; then
    for row in "${rows[@]}"; do
      (
        reducer=prompt-topk; [ "$row" = mivpg-plain ] && reducer=pool
        mlp="--prompt-mlp $RUNS/mv-$row"; [ "$row" = mivpg-plain ] && mlp="--no-prompt-mlp"
        rm -rf "$RUNS/bundle-$row"
        # budget, positions and N_max as trained (train_config.json)
        read -r budget positions nmax < <(python3 -c "import json; c = json.load(open('$RUNS/mv-$row/train_config.json')); print(c['budget'], c['positions'], c['n_max'])")
        $CLI export "$RUNS/mv-$row" $mlp --visual-tokens "$budget" --reducer $reducer --visual-positions "$positions" \
            --out "$RUNS/bundle-$row" --quiet
        if [ "$row" = concat ]; then
          $CLI add-graphs "$RUNS/bundle-$row" --multi-image concat --n-max "$nmax"
        else
          $CLI add-graphs "$RUNS/bundle-$row" --adapter "$RUNS/mv-$row" --n-max "$nmax"
        fi
      ) > "$RUNS/export-$row.log" 2>&1 &
    done
    wait
    tail -n 2 "$RUNS"/export-*.log
  fi
  if [ "$phase" != export ]; then
    frames=${2:-4}
    for row in "${rows[@]}"; do
      $CLI eval "$RUNS/bundle-$row" --multiview --frames "$frames" --n "$EVAL_N" --split test --jobs 14 --device cpu \
          --max-new-tokens 8 --quiet --json "$RUNS/eval-$row-${frames}f.json" | tail -n 8
    done
  fi
  if [ "$phase" = finish ] && [ -d "$RUNS/bundle-$SHIP" ]; then  # forgetting: the single-frame families, 500,
    # through the adapter and (a copy with multi_image.single_frame "own") from the frame's own tokens
    rm -rf "$RUNS/bundle-$SHIP-own" && cp -r "$RUNS/bundle-$SHIP" "$RUNS/bundle-$SHIP-own"
    $CLI add-graphs "$RUNS/bundle-$SHIP-own" --adapter "$RUNS/mv-$SHIP" --single-frame own --overwrite \
        --n-max "$(python3 -c "import json; print(json.load(open('$RUNS/mv-$SHIP/train_config.json'))['n_max'])")"
    for b in "$SHIP" "$SHIP-own"; do
      $CLI eval "$RUNS/bundle-$b" --n 500 --split test --jobs 14 --device cpu --quiet \
          --json "$RUNS/eval-$b-single.json" | tail -n 12
    done
  fi
  pack
  ;;
single)
  $CLI eval "$RUNS/bundle-$SHIP" --n 2000 --split test --jobs 14 --device cpu --quiet \
      --json "$RUNS/eval-$SHIP-single.json" | tail -n 12
  pack
  ;;
latency)
  python3 scripts/mivpg_table.py measure --preset edge-0.5b --device cuda --work "$RUNS/latency" \
      --out "$RUNS/latency-gpu.json"
  pack
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
