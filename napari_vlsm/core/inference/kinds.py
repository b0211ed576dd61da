"""Which images to correct first: the least sure image of each kind of image not yet
corrected, so a round of corrections covers the folder instead of twenty near copies of the
hardest image (batch active learning joins uncertainty with diversity for this reason;
grouping as in TypiClust: Hacohen, Dekel and Weinshall, ICML 2022).

Images are described by the model's own image encoder (each feature level averaged over the
image, scaled to unit length); k-means groups the folder into as many groups as there will be
corrected images; the next image comes from the largest group with the fewest corrections.
Within the group it is the one the model is least sure of (``core/inference/uncertainty.py``),
the first in the folder where the scores tie; without scores, the most typical one (closest
neighbours), TypiClust's choice, which ``benchmarks/bench_corrections.py`` measured as the
weaker (docs/corrections.md). One image in four is drawn at random instead
(``with_random_checks``): the stop estimate is read on those, since the least sure images
make the model look worse than it is on the rest.
"""

from __future__ import annotations

import numpy as np

NEIGHBOURS = 20    # neighbours whose mean distance measures how typical an image is
MIN_GROUP = 5      # smaller groups are outliers, not a kind of image
MAX_GROUPS = 500
CHECK_EVERY = 4    # one image in four is drawn at random: the stop estimate is read on those


def typicality(points: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """1 / mean distance to the ``neighbours`` nearest other points: high where points crowd."""
    if len(points) < 2:
        return np.ones(len(points))
    k = max(1, min(neighbours, len(points) - 1))
    d = np.sqrt(np.maximum(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1), 0))
    nearest = np.sort(d, axis=1)[:, 1:k + 1]
    return 1.0 / (nearest.mean(axis=1) + 1e-12)


def groups(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means group of each row (k-means++ start, fixed ``seed``); no more groups than there
    are different rows (copies of one image are one kind)."""
    import warnings

    from scipy.cluster.vq import kmeans2

    k = int(min(max(k, 1), len(np.unique(embeddings, axis=0))))
    if k == 1:
        return np.zeros(len(embeddings), dtype=int)
    with warnings.catch_warnings():  # a group left empty is only one group fewer
        warnings.simplefilter("ignore", UserWarning)
        _, labels = kmeans2(embeddings.astype(np.float64), k, minit="++", seed=seed)
    return labels


def by_kind(embeddings: np.ndarray, done, n: int, seed: int = 0, scores=None) -> list[int]:
    """The next ``n`` rows (indices) to correct, in order, of those not ``done`` (a boolean per
    row): each from the largest group with the fewest done rows; given ``scores`` (one per row,
    higher is less sure) the least sure of it, the first on ties, else its most typical."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    done = np.asarray(done, dtype=bool)
    todo = int((~done).sum())
    n = min(n, todo)
    if n <= 0:
        return []
    label = groups(embeddings, min(int(done.sum()) + n, MAX_GROUPS), seed)
    count = {g: int(done[label == g].sum()) for g in np.unique(label)}
    size = {g: int((label == g).sum()) for g in count}
    big = [g for g in count if size[g] >= MIN_GROUP] or list(count)
    rank = {}
    taken = done.copy()
    out = []
    while len(out) < n:
        free = [g for g in big if (~taken[label == g]).any()] or [g for g in count if (~taken[label == g]).any()]
        g = min(free, key=lambda g: (count[g], -size[g], g))
        members = np.flatnonzero((label == g) & ~taken)
        if scores is not None:
            pick = members[np.argmax(np.asarray(scores, dtype=float)[members])]
        else:
            if g not in rank:
                inside = np.flatnonzero(label == g)
                rank[g] = dict(zip(inside.tolist(), typicality(embeddings[inside]).tolist()))
            pick = max(members.tolist(), key=lambda i: (rank[g][i], -i))
        out.append(int(pick))
        taken[pick] = True
        count[g] += 1
    return out


def with_random_checks(chosen: list[int], todo, every: int = CHECK_EVERY, seed=None) -> tuple[list[int], list[int]]:
    """``chosen`` with every ``every``-th place (the 4th, the 8th...) given to an image drawn at
    random among the others of ``todo``, and the images drawn. The model's Dice on the images
    not yet corrected is estimated on those drawn: the others were chosen for being hard, so
    their corrections say less of the rest than the model's true Dice."""
    rng = np.random.default_rng(seed)
    taken = set(chosen)
    rest = [i for i in todo if i not in taken]
    out, drawn = list(chosen), []
    for place in range(every - 1, len(out), every):
        if not rest:
            break
        out[place] = rest.pop(int(rng.integers(len(rest))))
        drawn.append(out[place])
    return out, drawn

