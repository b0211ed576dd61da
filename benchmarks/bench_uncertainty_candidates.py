"""Candidate uncertainty scores against the true error (Spearman's rho with 1 - Dice), on the
pool images a round-1 model of bench_corrections.py did not train on (its pool order, less the
first 20): the shipped scores of core/inference/uncertainty.py and candidates computed here,
with PREV_MODEL as the previous round's model. Results: docs/corrections.md, issue 41.

    python benchmarks/bench_uncertainty_candidates.py "runs/c41/isic_s0/current recipe/round1/best" \
        runs/c41/isic_s0/base ../shared/data/isic "skin melanoma" "" 100 0 120

usage: MODEL PREV_MODEL DOMAIN PROMPT TARGET TEST_FROM_POOL SEED [N]; one torch thread."""
import json
import sys
from pathlib import Path
import numpy as np
import torch
from scipy.stats import spearmanr
sys.path.insert(0, "benchmarks")
torch.set_num_threads(1)
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.inference.uncertainty import expected_error, score_image
from napari_vlsm.core.data.training_sets import benchmark_examples

model, prev, domain, prompt, target, tfp, seed = sys.argv[1:8]
n = int(sys.argv[8]) if len(sys.argv) > 8 else 120
rows = benchmark_examples(Path(domain), "train")
if target:
    rows = [e for e in rows if e.target == target.casefold()]
held = set(np.random.default_rng(12345).permutation(len(rows))[:int(tfp)].tolist())
pool = [e for i, e in enumerate(rows) if i not in held]
pool = [pool[i] for i in np.random.default_rng(int(seed)).permutation(len(pool))][20:20 + n]
pred = Predictor(load_model(model, device="cpu", dtype="fp32"), flip_average=False)
old = Predictor(load_model(prev, device="cpu", dtype="fp32"), flip_average=False)

def softdice(a, b):
    return float(2 * (a * b).sum() / (a.sum() + b.sum() + 1e-6))

out = {k: [] for k in ("flip", "prompts", "margin", "peak", "soft", "softflip", "prev", "softprev", "area", "tta", "expected",
                             "expected_one_view", "expected_5")}
err = []
for ex in pool:
    image, truth = ex.load()
    s = score_image(pred, image, prompt)
    for kind in ("flip", "prompts", "margin", "expected"):  # the shipped scores (expected: both views)
        out[kind].append(s.value(kind))
    view, mirror = pred.predict_batch([image, image[:, ::-1]], [prompt], 0.5)
    p, pm = view.probs[0], mirror.probs[0][:, ::-1]
    m = p >= 0.5
    err.append(1 - dice(m, truth))
    out["peak"].append(1 - float(p.max()))
    out["soft"].append(1 - softdice(p, m.astype(np.float32)))
    out["softflip"].append(1 - softdice(p, pm))
    q = old.predict_batch([image], [prompt], 0.5)[0].probs[0]
    out["prev"].append(1 - dice(m, q >= 0.5))
    out["softprev"].append(1 - softdice(p, q))
    out["area"].append(-float(m.mean()))
    out["expected_one_view"].append(expected_error(p, m))
    out["expected_5"].append(float(np.minimum(p, 1 - p).sum() / max(float(m.sum()), 0.05 * m.size)))  # a 5% floor
    # test-time transforms: a vertical mirror and a 0.75 zoom, soft disagreement with the view
    up = pred.predict_batch([image[::-1]], [prompt], 0.5)[0].probs[0][::-1]
    out["tta"].append(1 - (softdice(p, pm) + softdice(p, up)) / 2)
res = {k: float(spearmanr(v, err).statistic) for k, v in out.items()}
res.update(mean_error=float(np.mean(err)), n=len(err))
print(json.dumps({"model": model, "domain": domain, **res}))
