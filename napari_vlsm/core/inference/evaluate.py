"""Evaluation against ground truth on a folder in the benchmark's format."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from napari_vlsm.core.images.metrics import dice, iou
from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.data.prompts import TEXT_TYPES_NAMED, pick_prompt
from napari_vlsm.core.data.training_sets import Example, benchmark_examples


def planned_examples(data_dir, prompt_type: str = "p1", split: str = "val", seed: int = 0,
                     limit: int | None = None) -> Iterator[tuple[Example, str]]:
    """(example, its prompt) for the first ``limit`` images of the split (None: all), the
    prompts drawn in this order with one generator seeded ``seed``: every way of evaluating
    (one process, a cluster) asks each image the same prompt."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit is how many images to score (0 or more, None: all), not {limit!r}.")
    rng = random.Random(seed)
    for ex in benchmark_examples(Path(data_dir), split)[:limit]:
        if not ex.prompts.get(prompt_type):
            raise ValueError(f"{ex.name} has no prompt of type {prompt_type}; "
                             f"the benchmark's types with text are {TEXT_TYPES_NAMED}.")
        yield ex, pick_prompt({"prompts": ex.prompts}, prompt_type, rng)


def score_example(predictor: Predictor, ex: Example, prompt: str, threshold: float) -> dict:
    """One row: name, prompt, dice, iou (at the image's own size), areas."""
    image, truth = ex.load()
    predictor.set_image(image)
    mask = predictor.predict(prompt, threshold).masks[0]
    return {"image": ex.name, "prompt": prompt, "dice": dice(mask, truth), "iou": iou(mask, truth),
            "area": int(mask.sum()), "true_area": int(truth.sum())}


def evaluate(predictor: Predictor, data_dir, prompt_type: str = "p1", split: str = "val",
             threshold: float = DEFAULT_THRESHOLD, seed: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Yield one row per image (``score_example``) for the first ``limit`` images of the
    split (None: all)."""
    for ex, prompt in planned_examples(data_dir, prompt_type, split, seed, limit):
        yield score_example(predictor, ex, prompt, threshold)


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    if not n:
        return {"n": 0, "dice": float("nan"), "iou": float("nan")}
    return {"n": n, "dice": sum(r["dice"] for r in rows) / n, "iou": sum(r["iou"] for r in rows) / n}
