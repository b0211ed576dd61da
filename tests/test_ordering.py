"""``order_images``, the one function behind the series' next image, ``rank`` and the
corrections benchmark, gives the orders each of them worked out for itself before (the old
code is kept here as the reference), on planted groups of images."""

import numpy as np
import pytest

from napari_vlsm.core.inference.kinds import by_kind, with_random_checks
from napari_vlsm.core.inference.ordering import ORDERS, order_images


def planted(sizes, seed=0):
    rng = np.random.default_rng(seed)
    points = []
    for k, n in enumerate(sizes):
        c = np.zeros(len(sizes))
        c[k] = 10.0
        points += list(c + rng.normal(0, 0.05, (n, len(sizes))))
    return np.array(points)


def old_kinds_first(embeddings, done, scores, n):
    """``kinds.kinds_first`` as ``rank`` called it before."""
    done = np.asarray(done, dtype=bool)
    chosen, drawn = [], []
    if n:
        chosen, drawn = with_random_checks(by_kind(embeddings, done, n, scores=scores),
                                           np.flatnonzero(~done).tolist(), seed=int(done.sum()))
    taken = set(chosen)
    rest = sorted((i for i in range(len(done)) if i not in taken), key=lambda i: (done[i], -scores[i], i))
    return chosen + rest, drawn


@pytest.mark.parametrize("n", [0, 2, 8, 30])
@pytest.mark.parametrize("seed", [0, 1])
def test_rank_gets_the_orders_it_worked_out_before(n, seed):
    points = planted([12, 8, 6], seed)
    rng = np.random.default_rng(seed)
    scores = rng.random(len(points)).round(2).tolist()  # rounded: ties happen, and keep row order
    done = rng.random(len(points)) < 0.3
    rows, drawn = old_kinds_first(points if n else None, done, scores, n)
    got = order_images("kinds", done, scores, points, n=n)
    assert (got.rows, got.drawn) == (rows, drawn)
    assert got.chosen == min(n, int((~done).sum()))
    if n == 8:
        assert len(drawn) == 2  # the 4th and the 8th drawn at random
    if n == 0:
        assert order_images("uncertain", done, scores).rows == rows


def test_the_benchmarks_orders_are_the_ones_it_worked_out_before():
    """bench_corrections.py: random (the pool permuted by the seed), name (sorted by file
    name), the most uncertain of the candidates (a stable sort by score) and kinds (by kind with
    the grouping's seed, the random checks with their own seed)."""
    names = [f"img_{k:02d}.png" for k in (5, 3, 9, 1, 7, 2, 8, 0, 6, 4)]
    for seed in (0, 3):
        assert order_images("random", [False] * 10, seed=seed).rows == \
            np.random.default_rng(seed).permutation(10).tolist()
    assert order_images("name", [False] * 10, names=names).rows == sorted(range(10), key=lambda i: names[i])
    scores = [0.3, 0.9, 0.3, 0.1, 0.9, 0.5, 0.0, 0.3, 0.2, 0.9]
    assert order_images("uncertain", [False] * 10, scores).rows == sorted(range(10), key=lambda i: -scores[i])
    points = planted([12, 8, 6])
    done = np.arange(len(points)) < 4  # the corrected ones come first in the benchmark's rows
    values = [0.0] * 4 + np.linspace(1, 0, len(points) - 4).tolist()
    picks = by_kind(points, done, 8, seed=2, scores=values)
    picks, drawn = with_random_checks(picks, np.flatnonzero(~done).tolist(), seed=2 * 100 + 1)
    got = order_images("kinds", done, values, points, n=8, seed=2, check_seed=201)
    assert got.rows[:got.chosen] == picks and got.drawn == drawn


def test_every_order_puts_the_done_images_last_and_each_image_once():
    points = planted([6, 6])
    done = np.zeros(12, bool)
    done[[1, 4]] = True
    scores = np.linspace(0, 1, 12).tolist()
    names = [f"{c}.png" for c in "lkjihgfedcba"]
    for order in ORDERS:
        rows = order_images(order, done, scores, points, names, n=4).rows
        assert sorted(rows) == list(range(12)) and set(rows[-2:]) == {1, 4}, order
    assert order_images("name", done, names=names).rows[:3] == [11, 10, 9]


def test_unscored_images_come_after_the_scored_ones_and_unknown_orders_are_refused():
    done = [False] * 5
    assert order_images("uncertain", done, [0.2, None, 0.9, None, 0.5]).rows == [2, 4, 0, 1, 3]
    with pytest.raises(ValueError, match="kinds, uncertain, name, random"):
        order_images("typical", done)
    with pytest.raises(ValueError, match="descriptions"):
        order_images("kinds", done, [0.1] * 5)
