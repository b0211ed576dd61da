"""Ranking a folder's images in the order to correct them, as a generator of progress: the job
behind ``napari-vlsm rank``. Each image is read once, scored (``uncertainty.py``) and, for the
order by kind, described by the image encoder; then ``ordering.order_images`` orders them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.ordering import KIND_BATCH, order_images
from napari_vlsm.core.inference.uncertainty import DEFAULT_SCORE, SCORES

RANK_ORDERS = ("kinds", "uncertain")


@dataclass
class RankProgress:
    kind: str                    # "image": one image looked at | "done": every image, ranked
    seen: int                    # images looked at so far
    total: int
    path: Path | None = None     # the image just looked at
    error: str = ""              # why it could not be scored (it is left out of the ranking)
    rows: list | None = None     # at "done": one dict per image scored, in the order to correct them


def check_rank_options(order: str, score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"The score is one of {', '.join(SCORES)}, not {score!r}.")
    if order not in RANK_ORDERS:
        raise ValueError(f"The order is {' or '.join(RANK_ORDERS)}, not {order!r}.")


def rank_images(backend, images: list[Path], prompt: str, order: str = "kinds", batch: int = KIND_BATCH,
                score: str = DEFAULT_SCORE, done=(), threshold: float = DEFAULT_THRESHOLD) -> Iterator[RankProgress]:
    """Score each of ``images`` for ``prompt`` with ``backend`` and rank them: with ``order``
    "kinds" the least sure image of each kind of image for the first ``batch`` (one in four
    drawn at random), then the most uncertain by ``score``; "uncertain": the most uncertain
    first. The images named in ``done`` (file names an image series marked done) go last.
    Each row: rank, image, chosen (kind, random, uncertainty or done), score, every score, done."""
    from napari_vlsm.core.images.imageio import read_image
    from napari_vlsm.core.inference.predictor import Predictor
    from napari_vlsm.core.inference.uncertainty import score_image

    check_rank_options(order, score)
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("Give the prompt to rank by, e.g. 'polyp'.")
    done = set(done)
    predictor = Predictor(backend, flip_average=False)  # the two views are what is compared
    rows, described = [], []
    for k, path in enumerate(images):
        try:
            image = read_image(path)
            s = score_image(predictor, image, prompt, threshold)
            if order == "kinds":
                described.append(predictor.embed([image])[0])
            rows.append({"image": str(path), "chosen": "", "score": s.value(score), **s.as_dict(),
                         "done": Path(path).name in done})
        except (OSError, ValueError, RuntimeError) as exc:
            yield RankProgress("image", k + 1, len(images), Path(path), str(exc))
            continue
        yield RankProgress("image", k + 1, len(images), Path(path))
    if not rows:
        raise ValueError("No image could be scored.")
    ranked = order_images(order, [r["done"] for r in rows], [r["score"] for r in rows],
                          np.array(described) if order == "kinds" else None, n=batch if order == "kinds" else 0)
    drawn = set(ranked.drawn)
    for k, i in enumerate(ranked.rows):
        rows[i]["chosen"] = ("done" if rows[i]["done"] else "random" if i in drawn else
                             "kind" if k < ranked.chosen else "uncertainty")
    yield RankProgress("done", len(images), len(images),
                       rows=[{"rank": k + 1, **rows[i]} for k, i in enumerate(ranked.rows)])
