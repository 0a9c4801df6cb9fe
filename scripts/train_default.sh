#!/usr/bin/env bash
# Reproduce the packaged default text-to-image model (tokenloom/assets/default/text-to-image) from scratch, on CPU:
#   1. the VQ tokenizer        configs/tokenizer/vq_shapes.yaml     (32x32 -> 8x8 tokens, 512 codes)
#   2. text conditioner + raster AR generator, trained jointly     configs/pipeline/shapes_default.yaml
#      then continued with EMA                                     configs/pipeline/shapes_default_finetune.yaml
#      on new scenes                                               configs/pipeline/shapes_default_stage3.yaml
#      and with bf16 autocast                                      configs/pipeline/shapes_default_stage4.yaml
#      and batch 64                                                configs/pipeline/shapes_default_stage5.yaml
#      and batch 128                                               configs/pipeline/shapes_default_stage6.yaml
#      on new scenes again                                         configs/pipeline/shapes_default_stage7.yaml
#   3. the caption scorer that reranks candidates                 configs/scoring/shapes_captioner.yaml
#      attached to the pipeline: best of 8 candidates per image    scripts/attach_scorer.py
#   4. shapes-GenEval on the held-out prompt list (100 prompts per category, 4 samples each)
#   5. with --install: copy the pipeline folder into the package
# Usage: scripts/train_default.sh [OUT_DIR=runs/default/repro] [--install]
# CPU time (1 thread; measured on the shared 2-core machine): see docs/default_model.md.
set -euo pipefail
OUT=runs/default/repro
INSTALL=0
for arg in "$@"; do
  case "$arg" in
    --install) INSTALL=1 ;;
    *) OUT="$arg" ;;
  esac
done
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python}

if [ ! -f "$OUT/tokenizer/config.json" ]; then
  $PY scripts/train_tokenizer.py --config configs/tokenizer/vq_shapes.yaml --output-dir "$OUT/tokenizer" --no-progress
fi
$PY scripts/train_text_to_image.py --config configs/pipeline/shapes_default.yaml --output-dir "$OUT/stage1" \
    tokenizer.path="$OUT/tokenizer" --no-progress
# stages 2-7 each continue the folder of the stage before; the last one is the model
prev="$OUT/stage1"
for recipe in finetune stage3 stage4 stage5 stage6 stage7; do
  case "$recipe" in finetune) out="$OUT/stage2" ;; stage7) out="$OUT/model" ;; *) out="$OUT/$recipe" ;; esac
  $PY scripts/train_text_to_image.py --config "configs/pipeline/shapes_default_$recipe.yaml" --output-dir "$out" \
      generator.init_from="$prev" --no-progress
  prev="$out"
done
$PY scripts/train_scorer.py --config configs/scoring/shapes_captioner.yaml --output-dir "$OUT/scorer" \
    reconstruct.path="$OUT/tokenizer" --no-progress
$PY scripts/attach_scorer.py --model "$OUT/model" --scorer "$OUT/scorer" --num-candidates 8
$PY scripts/make_geneval_prompts.py --out "$OUT/prompts_heldout.jsonl" --seed 0 --per-category 100
$PY scripts/generate_geneval.py --model "$OUT/model" --prompts "$OUT/prompts_heldout.jsonl" \
    --outdir "$OUT/geneval_heldout" --n-samples 4
$PY scripts/evaluate_geneval.py "$OUT/geneval_heldout" --no-progress
if [ "$INSTALL" = 1 ]; then
  DEST=tokenloom/assets/default/text-to-image
  rm -rf "$DEST" && mkdir -p "$DEST"
  cp -r "$OUT/model/." "$DEST/"
  echo "installed $OUT/model -> $DEST"
fi
