"""The order in which an annotator corrects a folder's images: one function, ``order_images``,
for the image series, ``napari-vlsm rank`` and ``benchmarks/bench_corrections.py``.

Orders (``ORDERS``):

* ``kinds`` (the default): the least sure image of each kind of image not yet corrected, for a
  batch of ``n`` (``core/inference/kinds.py``), one place in ``CHECK_EVERY`` given to an image
  drawn at random, on which the stop estimate is read; then the rest least sure first.
* ``uncertain``: the least sure first (``core/inference/uncertainty.py``), ties in row order.
* ``name``: by file name.
* ``random``: a seeded permutation.

The rows corrected already (``done``) come last, in each order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_vlsm.core.inference.kinds import by_kind, with_random_checks

ORDERS = ("kinds", "uncertain", "name", "random")
DEFAULT_ORDER = "kinds"
KIND_BATCH = 20  # images chosen together by kind when nothing says how many are corrected between trainings


@dataclass
class Ordering:
    rows: list[int]   # every row (image), in the order to correct them; the done rows last
    chosen: int       # the first ``chosen`` rows were picked together as a batch (by kind); 0 in the other orders
    drawn: list[int]  # rows of that batch handed out at random, on which the stop estimate is read


def order_images(order: str, done, scores=None, embeddings=None, names=None, n: int = KIND_BATCH,
                 seed: int = 0, check_seed: int | None = None) -> Ordering:
    """Every row of a folder's images in the order to correct them.

    ``done``: a boolean per row (corrected already). ``scores``: the uncertainty of each row
    (higher is less sure; None for a row not scored, which comes after the scored ones).
    ``embeddings``: (rows, d) descriptions by the image encoder, needed by ``kinds``. ``names``:
    the file names, for ``name`` (row order without them). ``n``: the batch ``kinds`` chooses by
    kind (as many as are corrected before the next training; 0: none, least sure first).
    ``seed``: the grouping's k-means and the ``random`` order. ``check_seed``: the draws of the
    random checks (default: the number of rows done, so each batch draws anew)."""
    if order not in ORDERS:
        raise ValueError(f"Unknown order {order!r}; use one of {', '.join(ORDERS)}.")
    done = np.asarray(done, dtype=bool)
    rows = range(len(done))
    if order == "random":
        todo = np.flatnonzero(~done)
        shuffled = todo[np.random.default_rng(seed).permutation(len(todo))].tolist()
        return Ordering(shuffled + np.flatnonzero(done).tolist(), 0, [])
    if order == "name":
        key = (lambda i: (done[i], names[i], i)) if names is not None else (lambda i: (done[i], i))
        return Ordering(sorted(rows, key=key), 0, [])
    chosen, drawn = [], []
    if order == "kinds" and n > 0:
        if embeddings is None:
            raise ValueError("The order by kind needs the images' descriptions (embeddings).")
        filled = [0.0 if s is None else s for s in scores] if scores is not None else None
        chosen, drawn = with_random_checks(by_kind(embeddings, done, n, seed=seed, scores=filled),
                                           np.flatnonzero(~done).tolist(),
                                           seed=int(done.sum()) if check_seed is None else check_seed)
    taken = set(chosen)
    rest = sorted((i for i in rows if i not in taken), key=lambda i: _least_sure_first(i, done, scores))
    return Ordering(chosen + rest, len(chosen), drawn)


def _least_sure_first(i: int, done: np.ndarray, scores) -> tuple:
    if scores is None or scores[i] is None:
        return done[i], True, 0.0, i
    return done[i], False, -scores[i], i
