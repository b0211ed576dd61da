"""How unsure the model is of an image, so annotators correct the images it gets wrong first.

Four scores, each from what the predictor already gives (one encoder pass of the image and
its mirror, a few cheap decoder passes):

* ``expected`` (the default): the pixels the model expects to get wrong under its own
  probabilities (the mean of the two views), over the size of its mask (at least 1% of the
  image). Spearman's rho with the true error after one round of corrections on three domains the
  model had never seen: 0.65 (dermoscopy), 0.75 (fetal ultrasound), 0.65 (COVID-19 infection,
  where two thirds of the right answers are empty).
* ``flip``: 1 - Dice between the mask of the image and the mirrored mask of its mirror. A
  model that knows where the object is answers the same for both views.
* ``prompts``: mean 1 - Dice between the mask of the prompt and the masks of other phrasings of
  the same class ("one breast tumor", "breast tumor in the image"): the medvlsm authors'
  active-learning follow-up ranks images by how much masks from different prompts disagree.
* ``margin``: the share of the image's candidate pixels (probability above threshold - 0.25)
  whose probability is within 0.25 of the threshold: a mask drawn with a soft edge.

Higher is less sure. ``prompts`` was the default before (docs/corrections.md: on BUSI it led
random order at 40 corrections in the first measurement, about as good as random over 4 rounds
and two pool orders); on the never-seen domains it reached rho 0.10, 0.47 and 0.22, and flip
and margin 0.2 on the infection rows, where an empty mask counts as certain for them. The series' and ``rank``'s default order takes the least sure image of each kind of
image (``core/inference/kinds.py``): as good on BUSI, without the near copies that the most
uncertain of a folder of video frames are. A model that finds nothing anywhere scores every
image alike; then the first images in the folder's order come.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD, binarize

SCORES = ("expected", "flip", "prompts", "margin")
DEFAULT_SCORE = "expected"  # the only one at rho >= 0.3 on three never-seen domains (docs/corrections.md)
MARGIN = 0.25
SIZE_FLOOR = 0.01  # share of the image: a smaller or empty mask counts as this large in ``expected``
ESTIMATE_LAST = 10  # corrections the stop estimate averages over


def phrasings(prompt: str) -> list[str]:
    """The prompt and other phrasings of the same class that claim nothing more about the image."""
    c = prompt.strip()
    return list(dict.fromkeys([c, f"one {c}", f"{c} in the image", f"a {c}, located in the image"]))


@dataclass
class ImageScore:
    flip: float
    prompts: float
    margin: float
    area: float  # share of the image the prompt's mask covers
    expected: float

    def value(self, kind: str = DEFAULT_SCORE) -> float:
        if kind not in SCORES:
            raise ValueError(f"Unknown uncertainty score {kind!r}; use one of {', '.join(SCORES)}.")
        return float(getattr(self, kind))

    def as_dict(self) -> dict:
        return asdict(self)


def score_image(predictor, image, prompt: str, threshold: float = DEFAULT_THRESHOLD) -> ImageScore:
    """Every score of one image for ``prompt``. ``predictor`` must not average views itself
    (``Predictor(backend, flip_average=False)``): the two views are what is compared."""
    image = np.asarray(image)
    texts = phrasings(prompt)
    view, mirror = predictor.predict_batch([image, image[:, ::-1]], texts, threshold)
    probs = view.probs
    mask = binarize(probs[0], threshold)
    mirrored = binarize(mirror.probs[0][:, ::-1], threshold)
    others = [1.0 - dice(mask, binarize(probs[k], threshold)) for k in range(1, len(texts))]
    candidates = probs[0] > threshold - MARGIN
    soft = np.abs(probs[0] - threshold) < MARGIN
    return ImageScore(flip=1.0 - dice(mask, mirrored), prompts=float(np.mean(others)) if others else 0.0,
                      margin=float((soft & candidates).sum() / max(int(candidates.sum()), 1)),
                      area=float(mask.mean()),
                      expected=expected_error((probs[0] + mirror.probs[0][:, ::-1]) / 2, mask))


def expected_error(probs: np.ndarray, mask: np.ndarray) -> float:
    """The pixels the model itself expects to get wrong, sum(min(p, 1 - p)), over the size of
    its mask, or of SIZE_FLOOR of the image where the mask is smaller. A confident empty answer
    scores near 0 and a faint object left undrawn high; mask-based scores (flip, prompts) call
    both certain, and soft Dice between views calls both unsure."""
    wrong = np.minimum(probs, 1.0 - probs).sum(dtype=np.float64)
    return float(wrong / max(float(mask.sum()), SIZE_FLOOR * mask.size))


def most_uncertain_first(scores: dict, kind: str = DEFAULT_SCORE) -> list:
    """The keys of ``scores`` (key -> ImageScore), most uncertain first; ties keep key order."""
    return sorted(scores, key=lambda k: -scores[k].value(kind))


def estimate_dice(agreements: list[float], last: int = ESTIMATE_LAST) -> float | None:
    """The model's Dice on images not yet corrected, estimated from how well its proposals
    agreed with the last corrections (Dice of proposal and saved mask); None before any."""
    recent = [a for a in agreements if a is not None][-last:]
    return float(np.mean(recent)) if recent else None


def score_files(backend, paths, prompt: str, score: list[bool], describe: bool = False, threshold: float = DEFAULT_THRESHOLD):
    """Generator: (index, description or None, ImageScore or None) for each of ``paths``, each
    file read once: its description by the image encoder with ``describe`` (for the order by
    kind, ``core/inference/kinds.py``), its scores where ``score[index]``, with one predictor
    that compares the two views; (index, None, None) for a file that cannot be read. Closing
    it stops between images."""
    from napari_vlsm.core.images.imageio import read_image
    from napari_vlsm.core.inference.predictor import Predictor

    predictor = Predictor(backend, flip_average=False)
    for i, path in enumerate(paths):
        try:
            image = read_image(path)
            yield (i, predictor.embed([image])[0] if describe else None,
                   score_image(predictor, image, prompt, threshold) if score[i] else None)
        except (OSError, ValueError):
            yield i, None, None
