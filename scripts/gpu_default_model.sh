#!/bin/bash
# The default model's GPU runs, phase by phase; each phase fits one 10-minute device call.
#
#   bash scripts/gpu_default_model.sh stage0 [SECONDS_TOTAL] [SECONDS_THIS_CALL]
#        stage 0 from scratch; the cosine schedule is sized to SECONDS_TOTAL of training (from the
#        rate measured in the first 150 steps), and this call stops at SECONDS_THIS_CALL with a
#        resumable state
#   bash scripts/gpu_default_model.sh resume0 [SECONDS_THIS_CALL]
#        continue stage 0 (same machine: the trainer state stays in $RUNS between calls)
#   bash scripts/gpu_default_model.sh cont0 DIR [SECONDS] [LR]
#        when the machine was replaced (its trainer state is lost): continue stage 0 from the bf16
#        weights that came back (DIR), fresh optimizer, cosine from LR over SECONDS ($EXTRA0: more
#        train flags, e.g. EXTRA0="--reduced-fraction 0.5")
#   [PARA=F] bash scripts/gpu_default_model.sh cont2 DIR [SECONDS] [LR]
#        more PIP-MM stage 2 (MLP + projector + LLM at half, prompt-topk, patch positions, 20% instructions) from a
#        shipped checkpoint DIR (e.g. models/default_model) on fresh scenes (data offset 250M), the questions
#        reworded with probability PARA (default 0.5, export/tasks/paraphrase.py), then the GPU eval of the result
#        on the test / phrasing / style / classic splits (2000 questions each) -> $RUNS/c2, $RUNS/evals ($W2: data
#        workers, default 14; $EXTRA2: more train flags, e.g. EXTRA2="--extra-questions relation=2")
#   [PARA=F] EXTRA_A=... EXTRA_B=... bash scripts/gpu_default_model.sh cont2ab DIR [SECONDS] [LR]
#        two cont2 runs side by side (W2=7 data workers each), one with $EXTRA_A, one with $EXTRA_B: both evals
#        come back, and the model of the better one (mean of the four splits; the log names it)
#   [PATCH=1] [INSTR=F] [PARA=F] [SEEDS="0 1 2"] [EVALS=0] [MERGE=1] [S0=DIR] bash scripts/gpu_default_model.sh finetune
#        stages 1-2 (PIP-MM) and the plain baseline for seeds 0-2 in parallel, then batched evals
#        (PATCH=1: PIP-MM's stage 2 and evals with --patch-positions / --visual-positions patch;
#        INSTR=F: stages 1-2 and the baseline with --instruction-fraction F, PARA=F with --paraphrase-fraction F;
#        SEEDS: the seeds trained; EVALS=0: no GPU evals, pip0 and plain0 come back at once; W2: data workers
#        of each run (2); MERGE=1: also seed 0's
#        stage 2 with the merge reducer at quarter budget, as merge0; SEQ=1 with PATCH=1: also seed 0's
#        stage 2 with sequence positions, as pipseq0; PF=1: also seed 0's stages 1-2 with the
#        prompt-first template (--template prompt-first), as pf0; PL=L: also seed 0's stages 1-2 with
#        the prompt vector from LLM layer L (--prompt-layer L), as pl0; S0: the stage-0 checkpoint,
#        default $RUNS/s0, e.g. runs/gpu/s0e carried from this machine)
#   [ARCH=m20] bash scripts/gpu_default_model.sh big0 [SECONDS_TOTAL] [SECONDS_THIS_CALL]
#        the next default's stage 0 from scratch (export/train/archs.py ARCH, its own tokenizer trained on the
#        generator's text), the cosine sized to SECONDS_TOTAL of training over all calls (rate measured in this
#        call's first 1000 steps); this call stops after SECONDS_THIS_CALL with a resumable state in $RUNS/big and
#        returns its portable copy (below)
#   bash scripts/gpu_default_model.sh big [SECONDS_THIS_CALL] [CARRIED_DIR]
#        continue it: from $RUNS/big on the same machine (optimizer kept), else from CARRIED_DIR (default
#        runs/big/s0: the portable copy of the last call, unpacked and carried in this call; fresh optimizer,
#        learning rate re-warmed over $REWARM steps, default 200)
#   bash scripts/gpu_default_model.sh variants FILES_DIR BASE [DST]
#        on the CPU side: what a finetune call brought back -> whole checkpoints DST/pip0, DST/plain0 ... (default
#        runs/finetune), the vision tower taken from the stage-0 checkpoint BASE (e.g. models/stage0/m21)
#   bash scripts/gpu_default_model.sh unpack FILES_DIR [DIR]
#        on the CPU side: what a big0/big call brought back (FILES_DIR) -> DIR (default runs/big/s0), the
#        directory the next call carries
#   Flags of big0/big: $DEVICE (auto; cpu for a smoke run), $BATCH (256), $W (data workers, 14), $LR (8e-4),
#   $WARMUP (300), $PARA (paraphrase fraction, 0.5), $PACK (1: --pack-questions, a scene's questions in one
#   sequence after its image; 0: a row a question), $EXTRA0 (more train flags, big0 only). A portable copy is
#   the run's bf16 model shards (< 15 MiB each; m20: 3 of them) + big-small.tar.gz (configs, tokenizer, log,
#   trainer_state.json, trainer_extra.safetensors), no optimizer state: 38 MB for m20, which a call carries
#   beside the tree once models/ and sdk/default_bundle are removed from the working tree for that call.
#
# Results are copied to $OUT (the files that come back from the device machine: at most 8, each
# < 16 MiB): weights in bf16, the trainer state shards, and a tar of every small file.
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-/tmp/pipmm-runs}
OUT=${OUT:-/tmp/pipmm-out}
T="python3 -m sdk.cli train"
mkdir -p "$RUNS" "$OUT"
phase=${1:?phase: stage0, resume0, cont0, cont2, finetune, big0, big, variants or unpack}

has_weights() {  # DIR: a checkpoint's weights are there, one file or shards (m20's model-0000k-of-0000n)
  compgen -G "$1/model*.safetensors" > /dev/null
}

pack_small() {  # the small files of every run in $RUNS -> $OUT/small.tar.gz (no weights, no trainer state)
  (cd "$RUNS" && tar czf "$OUT/small.tar.gz" --exclude='model*.safetensors' --exclude='trainer_state-*' \
      --exclude='projector.safetensors' --exclude='without_vision.safetensors' */ 2>/dev/null) || true
}

pack() {  # small files of every run -> one tar; listed weights -> one file each (a sharded DIR/model.safetensors:
          # its model-*-of-*.safetensors shards, e.g. 3 for m20, so mind the 8 files that come back)
  pack_small
  for f in "$@"; do
    if [ -f "$RUNS/$f" ]; then cp "$RUNS/$f" "$OUT/$(echo "$f" | tr / _)"; continue; fi
    for g in "$RUNS/$(dirname "$f")"/model-*-of-*.safetensors; do
      [ -f "$g" ] && cp "$g" "$OUT/$(echo "${g#"$RUNS"/}" | tr / _)"
    done
  done; true
}

pack_variants() {  # NAME...: each finetuned run's weights without the frozen vision tower (export.train.state split),
  # in 15 MiB parts (m20's is 17.2 MB, over the 16 MiB a file may be), its configs in the tar; `variants` joins them
  for n in "$@"; do
    has_weights "$RUNS/$n" || continue
    python3 -m export.train.state split "$RUNS/$n" "$RUNS/$n-wv" > /dev/null
    split -b 15M -d "$RUNS/$n-wv/without_vision.safetensors" "$OUT/$n-without_vision.part"
  done
  pack_small
}

pack_portable() {  # $RUNS/big -> its portable copy in $OUT: bf16 model shards + one tar of the small files
  rm -rf "$RUNS/big-portable"
  python3 -m export.train.state portable "$RUNS/big" "$RUNS/big-portable" > /dev/null
  (cd "$RUNS/big-portable" && tar czf "$OUT/big-small.tar.gz" --exclude='model*.safetensors' . && \
     cp model*.safetensors "$OUT/")
  python3 - "$RUNS/big/train_config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print("big:", c["arch"]["name"], f"{c['parameters']['total'] / 1e6:.2f}M parameters,", c.get("completed_steps"), "of",
      c["steps"], "steps,", "steps/s", c.get("measured_steps_per_s"), "| resumes", c["resumes"], "| val", c.get("val"))
PY
  tail -n 1 "$RUNS/big/log.jsonl"; ls -l "$OUT"
}

BIG="--device ${DEVICE:-auto} --workers ${W:-14} --save-every 1000000 --log-every 50 --val-scenes 64 --quiet"

summarize_evals() {  # one line per eval JSON under $RUNS/evals: overall and per-family accuracy
  python3 - "$RUNS/evals" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    r = json.load(open(f))
    print(f.split("/")[-1], round(r["overall"]["accuracy"], 4),
          {k: round(v["accuracy"], 3) for k, v in r["per_family"].items()})
PY
}

case $phase in
stage0)
  nvidia-smi -L || true
  rm -rf "$RUNS/s0"
  $T --stage 0 --out "$RUNS/s0" --steps 1000000 --time-budget "${2:-1100}" --stop-after-seconds "${3:-500}" \
     --warmup 300 --batch-size 256 --lr 1e-3 --save-every 1000000 --log-every 50 --val-scenes 32 --quiet
  pack s0/model.safetensors
  ;;
resume0)
  $T --stage 0 --out "$RUNS/s0" --resume --stop-after-seconds "${2:-520}" --save-every 1000000 --log-every 50 \
     --val-scenes 64 --quiet
  pack s0/model.safetensors
  ;;
cont0)
  rm -rf "$RUNS/s0"
  $T --stage 0 --init "${2:?DIR with the stage-0 files}" --out "$RUNS/s0" --steps 1000000 --time-budget "${3:-500}" \
     --warmup 100 --batch-size 256 --lr "${4:-6e-4}" --data-offset 5000000 --save-every 1000000 --log-every 50 \
     --val-scenes 64 --quiet $EXTRA0
  pack s0/model.safetensors
  ;;
cont2)
  rm -rf "$RUNS/c2" "$RUNS/evals"; mkdir -p "$RUNS/evals"
  $T --stage 2 --init "${2:?DIR with a PIP-MM checkpoint}" --out "$RUNS/c2" --seed 0 --steps 100000 \
     --time-budget "${3:-420}" --lr "${4:-2e-4}" --warmup 50 --batch-size 128 --workers "${W2:-14}" --val-scenes 0 --quiet \
     --log-every 50 --grounding-weight 0.25 --train-llm --budget half --reducer prompt-topk --patch-positions \
     --instruction-fraction 0.2 --paraphrase-fraction "${PARA:-0.5}" --data-offset 250000000 $EXTRA2
  E="python3 -m sdk.cli eval --quiet --batch-size 250 --device cuda --n 2000 --checkpoint $RUNS/c2 --prompt-mlp $RUNS/c2"
  for sp in test phrasing style classic; do
    $E --split $sp --budget half --reducer prompt-topk --visual-positions patch --json "$RUNS/evals/c2-$sp.json" \
       > /dev/null 2>&1 &
  done
  wait
  summarize_evals
  pack c2/model.safetensors
  ;;
cont2ab)
  # Two cont2 runs side by side on one GPU (W2 data workers each, default 7), A with $EXTRA2 $EXTRA_A, B with
  # $EXTRA2 $EXTRA_B, each in its own $RUNS/a|b; both runs' evals and small files come back, and the model shards
  # of the one whose mean over the four splits is higher (64 MiB come back: not both models)
  export W2=${W2:-7}
  for ab in a b; do
    extra=$EXTRA_A; [ $ab = b ] && extra=$EXTRA_B
    OUT="$RUNS/$ab-out" RUNS="$RUNS/$ab" EXTRA2="$EXTRA2 $extra" bash "$0" cont2 "${2:?DIR}" "${3:-330}" "${4:-2e-4}" \
      > "$RUNS/cont2-$ab.log" 2>&1 &
  done
  wait
  tail -n 12 "$RUNS/cont2-a.log" "$RUNS/cont2-b.log"
  best=$(python3 - "$RUNS" <<'PY'
import glob, json, sys
# an arm is eligible only with its four evals (a failed run or eval has fewer)
scores = {ab: [json.load(open(f))["overall"]["accuracy"] for f in glob.glob(f"{sys.argv[1]}/{ab}/evals/*.json")]
          for ab in "ab"}
mean = {ab: sum(v) / 4 for ab, v in scores.items() if len(v) == 4}
print(max(mean, key=mean.get) if mean else "none")
PY
)
  echo "better: $best"
  [ "$best" != none ] && cp "$RUNS/$best-out"/*.safetensors "$OUT/"
  for ab in a b; do [ -f "$RUNS/$ab-out/small.tar.gz" ] && cp "$RUNS/$ab-out/small.tar.gz" "$OUT/$ab-small.tar.gz"; done
  cp "$RUNS"/cont2-?.log "$OUT/"
  ls -l "$OUT"
  ;;
finetune)
  # PIP-MM stage 1 (prompt MLP alone, full budget) then stage 2 (MLP + projector + LLM at half,
  # prompt-topk); the plain baseline gets the same stage-2 fine-tune (projector + LLM at half, pool).
  P="--batch-size 128 --warmup 30 --workers ${W2:-2} --val-scenes 0 --quiet --log-every 20 --instruction-fraction ${INSTR:-0}"
  P="$P --paraphrase-fraction ${PARA:-0}"
  S0=${S0:-$RUNS/s0}
  G=${GROUNDING:-0.25}
  # PATCH=1: PIP-MM's stage 2 with the kept tokens at their patch positions (export those runs with
  # --visual-positions patch); the evals below then use the same positions.
  PP=""; EP=""; [ "${PATCH:-0}" = 1 ] && PP="--patch-positions" && EP="--visual-positions patch"
  stage2() {  # seed stage-1-dir out [flags]: PIP-MM's stage 2 (MLP + projector + LLM) from a stage-1 run
    $T --stage 2 --init "$2" --out "$3" --seed "$1" --steps 100000 --time-budget "${S2:-150}" \
       --lr 3e-4 --grounding-weight "$G" --train-llm $P "${@:4}"
  }
  chain() {  # seed name
    $T --stage 1 --init "$S0" --out "$RUNS/$2-s1" --seed "$1" --steps 100000 --time-budget "${S1:-120}" \
       --lr 1e-3 --grounding-weight "$G" $P
    if [ "$1" = 0 ]; then  # MERGE=1: merge at quarter budget; SEQ=1: the chain's with sequence positions
      [ "${MERGE:-0}" = 1 ] && { stage2 0 "$RUNS/pip0-s1" "$RUNS/merge0" --budget quarter --reducer merge \
                                   > "$RUNS/merge0.log" 2>&1 & }
      [ "${SEQ:-0}" = 1 ] && { stage2 0 "$RUNS/pip0-s1" "$RUNS/pipseq0" --budget half --reducer prompt-topk \
                                 > "$RUNS/pipseq0.log" 2>&1 & }
    fi
    stage2 "$1" "$RUNS/$2-s1" "$RUNS/$2" --budget half --reducer prompt-topk $PP
    wait
  }
  prompt_first() {  # seed 0's chain with the question before the image (issue 18's KV reuse)
    $T --stage 1 --init "$S0" --out "$RUNS/pf0-s1" --seed 0 --steps 100000 --time-budget "${S1:-120}" \
       --lr 1e-3 --grounding-weight "$G" --template prompt-first $P
    stage2 0 "$RUNS/pf0-s1" "$RUNS/pf0" --budget half --reducer prompt-topk --template prompt-first $PP
  }
  plain() {  # seed
    $T --stage 2 --init "$S0" --out "$RUNS/plain$1" --seed "$1" --no-prompt-mlp --steps 100000 \
       --time-budget $(( ${S1:-120} + ${S2:-150} )) --lr 3e-4 --budget half --reducer pool --train-llm $P
  }
  for s in 0 1 2; do rm -rf "$RUNS/pip$s" "$RUNS/pip$s-s1" "$RUNS/plain$s"; done
  rm -rf "$RUNS/merge0" "$RUNS/pipseq0" "$RUNS/pf0" "$RUNS/pf0-s1" "$RUNS/pl0" "$RUNS/pl0-s1"
  for s in ${SEEDS:-0 1 2}; do chain $s pip$s > "$RUNS/pip$s.log" 2>&1 & done
  [ "${PF:-0}" = 1 ] && { prompt_first > "$RUNS/pf0.log" 2>&1 & }
  [ -n "${PL:-}" ] && { { $T --stage 1 --init "$S0" --out "$RUNS/pl0-s1" --seed 0 --steps 100000 --prompt-layer "$PL" \
       --time-budget "${S1:-120}" --lr 1e-3 --grounding-weight "$G" $P && \
     stage2 0 "$RUNS/pl0-s1" "$RUNS/pl0" --budget half --reducer prompt-topk $PP; } > "$RUNS/pl0.log" 2>&1 & }
  for s in ${SEEDS:-0 1 2}; do plain $s > "$RUNS/plain$s.log" 2>&1 & done
  wait
  tail -n 2 "$RUNS"/*.log
  if [ "${EVALS:-1}" = 0 ]; then  # the evals run elsewhere (e.g. pipmm eval through the SDK on the CPU side)
    pack_variants pip0 plain0; echo "phase $phase done"; exit 0
  fi
  mkdir -p "$RUNS/evals"
  E="python3 -m sdk.cli eval --quiet --batch-size 250 --device cuda --split val --n 2000"
  O="--families color shape position"
  for s in 0 1 2; do
    $E $O --checkpoint "$RUNS/pip$s" --prompt-mlp "$RUNS/pip$s" --budget half --reducer prompt-topk $EP \
       --json "$RUNS/evals/obj-pip$s.json" > /dev/null 2>&1 &
    $E $O --checkpoint "$RUNS/plain$s" --budget half --reducer pool --json "$RUNS/evals/obj-plain$s.json" > /dev/null 2>&1 &
  done
  $E --checkpoint "$RUNS/pip0" --prompt-mlp "$RUNS/pip0" --budget half --reducer prompt-topk $EP \
     --json "$RUNS/evals/pip0-half-topk.json" > /dev/null 2>&1 &
  $E --checkpoint "$RUNS/pip0" --prompt-mlp "$RUNS/pip0" --budget full --json "$RUNS/evals/pip0-full.json" \
     > /dev/null 2>&1 &
  # the issue-19 splits (test: trained styles and phrasings; phrasing / style: held out), seed 0 at half
  for sp in test phrasing style; do
    ${E/--split val/--split $sp} --checkpoint "$RUNS/pip0" --prompt-mlp "$RUNS/pip0" --budget half \
       --reducer prompt-topk $EP --json "$RUNS/evals/pip0-$sp.json" > /dev/null 2>&1 &
  done
  has_weights "$RUNS/pf0" && { ${E/--split val/--split test} --checkpoint "$RUNS/pf0" --prompt-mlp "$RUNS/pf0" \
     --budget half --reducer prompt-topk $EP --json "$RUNS/evals/pf0-test.json" > /dev/null 2>&1 & }
  has_weights "$RUNS/pl0" && { ${E/--split val/--split test} --checkpoint "$RUNS/pl0" --prompt-mlp "$RUNS/pl0" \
     --budget half --reducer prompt-topk $EP --json "$RUNS/evals/pl0-test.json" > /dev/null 2>&1 & }
  has_weights "$RUNS/merge0" && { $E --checkpoint "$RUNS/merge0" --prompt-mlp "$RUNS/merge0" \
     --budget quarter --reducer merge --json "$RUNS/evals/merge0-quarter.json" > /dev/null 2>&1 & }
  has_weights "$RUNS/pipseq0" && { $E --checkpoint "$RUNS/pipseq0" --prompt-mlp "$RUNS/pipseq0" \
     --budget half --reducer prompt-topk --json "$RUNS/evals/pipseq0-half-topk.json" > /dev/null 2>&1 & }
  wait
  summarize_evals
  # 8 files and 64 MiB come back at most: the tar and each listed run's weights without its (frozen) vision tower,
  # 2 parts each at m20's size (pf0 with PF=1, pl0 with PL=L); the other seeds are measured above
  pack_variants pip0 plain0 merge0 pf0 pl0
  ;;
big0)
  nvidia-smi -L || true
  rm -rf "$RUNS/big"
  $T --stage 0 --arch "${ARCH:-m20}" --out "$RUNS/big" --steps 10000000 --time-budget "${2:-4000}" \
     --stop-after-seconds "${3:-480}" --warmup "${WARMUP:-300}" --batch-size "${BATCH:-256}" --lr "${LR:-8e-4}" \
     --paraphrase-fraction "${PARA:-0.5}" $([ "${PACK:-1}" = 1 ] && echo --pack-questions) $BIG $EXTRA0
  pack_portable
  ;;
big)
  if [ ! -f "$RUNS/big/trainer_state.json" ]; then  # a fresh machine: start from the carried portable copy
    src=${3:-runs/big/s0}
    [ -f "$src/trainer_state.json" ] || { echo "no $RUNS/big and no portable copy in $src: carry it" >&2; exit 2; }
    mkdir -p "$RUNS" && cp -r "$src" "$RUNS/big"
  fi
  $T --stage 0 --out "$RUNS/big" --resume --stop-after-seconds "${2:-480}" --rewarmup "${REWARM:-200}" $BIG
  pack_portable
  ;;
variants)
  # on the CPU side: what a finetune call brought back (FILES_DIR) -> one whole checkpoint per run in DST/NAME,
  # its vision tower from the stage-0 checkpoint BASE (frozen in stages 1-2)
  src=${2:?FILES_DIR: the files a finetune call brought back}; base=${3:?BASE: the stage-0 checkpoint}
  dst=${4:-runs/finetune}
  rm -rf "$dst" && mkdir -p "$dst/wv" && tar xzf "$src/small.tar.gz" -C "$dst/wv"
  for part0 in "$src"/*-without_vision.part00; do
    n=$(basename "$part0" -without_vision.part00)
    cat "$src/$n"-without_vision.part* > "$dst/wv/$n-wv/without_vision.safetensors"
    python3 -m export.train.state assemble "$base" "$dst/wv/$n-wv" "$dst/$n"
  done
  ;;
unpack)
  src=${2:?FILES_DIR: the files a big0/big call brought back}; dst=${3:-runs/big/s0}
  rm -rf "$dst" && mkdir -p "$dst"
  tar xzf "$src/big-small.tar.gz" -C "$dst" && cp "$src"/model*.safetensors "$dst/"
  du -sh "$dst"
  ;;
*)
  echo "unknown phase $phase" >&2; exit 2
  ;;
esac
echo "phase $phase done"
