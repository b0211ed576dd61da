#!/usr/bin/env bash
# Train the embedded offline model from ../shared/data with a fixed seed, then install it
# in the package (napari_vlsm/assets/polyp_film_unet). Two stages of the project's own finetune
# command: 30 epochs from scratch, then 6 epochs at a lower learning rate with a much wider set
# of negative prompts. 48 + 10 minutes on the 2-core CPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/polyp_film_unet}
.venv/bin/napari-vlsm finetune "$DATA/kvasir_seg" "$DATA/clinicdb" --model new:film-unet --train full \
  --out "$OUT" --epochs 30 --batch-size 16 --lr 2e-3 --schedule onecycle --crop 224 \
  --negatives-file scripts/negative_prompts.txt --patience 100 --seed 0
.venv/bin/napari-vlsm finetune "$DATA/kvasir_seg" "$DATA/clinicdb" --model "$OUT/best" --train full \
  --out "${OUT}_stage2" --epochs 6 --batch-size 16 --lr 3e-4 --schedule onecycle --crop 224 \
  --negatives-file scripts/negative_prompts_wide.txt --patience 100 --seed 1
rm -rf napari_vlsm/assets/polyp_film_unet
cp -r "${OUT}_stage2/best" napari_vlsm/assets/polyp_film_unet
echo "Installed ${OUT}_stage2/best as the embedded default model."
