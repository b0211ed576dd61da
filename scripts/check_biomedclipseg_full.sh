#!/usr/bin/env bash
# The BiomedCLIPSeg path at full size, offline: a BiomedCLIP-shaped open_clip folder with random
# weights in the hub's layout (ViT-B/16 at 224, BERT-base text tower, 786 MB pickle), converted,
# finetuned (decoder, 1 epoch), used to segment, exported to ONNX and used again; then its
# probabilities against the benchmark's composition built from the same open_clip weights
# (tests/test_biomedclipseg.py's reference) and of the ONNX export against PyTorch. About 3 minutes
# and 2.6 GB of memory on 2 CPU cores; it works in a new temporary folder and says which.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d "${TMPDIR:-/tmp}/vlsm-biomedclipseg-full.XXXX")
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${THREADS:-2}
echo "Working in $W"
PY=.venv/bin/python
CLI=.venv/bin/napari-vlsm
$PY -c "from napari_vlsm.core.random_models import build_random_open_clip as b; \
b('$W/hub/BiomedCLIP', 'base', text_folder='$W/hub/BiomedBERT')"
$CLI models convert "$W/hub/BiomedCLIP" --text-tower "$W/hub/BiomedBERT" -o "$W/model"
$PY -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \
from tests.conftest import small_copy, data_root; small_copy(data_root() / 'kvasir_seg', Path('$W/data/kvasir_seg'), 4, 2)"
$CLI finetune "$W/data/kvasir_seg" --model new:biomedclipseg --encoders "$W/model" --train decoder --epochs 1 \
  --batch-size 2 --out "$W/run"
$CLI segment "$W/data/kvasir_seg/images" -p polyp --model "$W/run/best" -o "$W/masks"
$CLI export-onnx "$W/run/best" "$W/onnx"
$CLI segment "$W/data/kvasir_seg/images" -p polyp --model "$W/onnx" -o "$W/masks_onnx"
$PY - "$W" <<'PY'
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
import numpy as np

from napari_vlsm.core.loading import load_model
from napari_vlsm.core.predictor import Predictor
from tests.test_biomedclipseg import _benchmark_probabilities

w = Path(sys.argv[1])
hub, model = (w / "hub" / "BiomedCLIP", w / "hub" / "BiomedBERT"), w / "run" / "best"
torch.manual_seed(0)
pixels, prompts = torch.randn(2, 3, 224, 224), ["polyp", "a small round tumour in the breast ultrasound image"]
with torch.no_grad():
    ours = torch.sigmoid(load_model(str(model), device="cpu", dtype="fp32").forward(pixels, prompts))
    diff = (ours - _benchmark_probabilities(hub, model, pixels, prompts, heads=12)).abs().max().item()
print(f"Largest difference from the benchmark's composition: {diff:.2e} (bar 1e-4)")
image = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
torch_pred, onnx_pred = Predictor(load_model(str(model), device="cpu")), Predictor(load_model(str(w / "onnx")))
torch_pred.set_image(image)
onnx_pred.set_image(image)
onnx_diff = np.abs(torch_pred.predict(prompts).probs - onnx_pred.predict(prompts).probs).max()
print(f"Largest difference of the ONNX export from PyTorch: {onnx_diff:.2e}")
sys.exit(0 if diff < 1e-4 and onnx_diff < 1e-3 else 1)
PY
