import numpy as np
import pytest

from napari_vlsm.core.images.preprocess import to_rgb8


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 1), (40, 50, 3), (40, 50, 4)])
def test_layouts_become_rgb(shape):
    arr = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    out = to_rgb8(arr)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    if shape[-1] == 4:
        np.testing.assert_array_equal(out, arr[..., :3])
    if len(shape) == 2:
        np.testing.assert_array_equal(out[..., 1], arr)


def test_uint16_percentile_window_stretches_to_full_range():
    arr = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
    arr[0, 0] = 65535  # one hot pixel must not squash the rest
    out = to_rgb8(arr)[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert np.median(out) == pytest.approx(127, abs=3)


def test_float_in_unit_range_is_scaled_not_windowed():
    arr = np.full((32, 32), 0.5, np.float32)
    arr[0, 0] = 0.0
    assert to_rgb8(arr)[5, 5, 0] == 128


def test_int16_ct_like_and_constant_images():
    ct = np.random.default_rng(1).integers(-1024, 3000, (32, 32)).astype(np.int16)
    out = to_rgb8(ct)
    assert out.dtype == np.uint8 and out.max() == 255
    assert to_rgb8(np.full((20, 20), 7.5)).max() == 0


@pytest.mark.parametrize("bad, words", [
    (np.zeros((0, 10)), "empty"),
    (np.zeros(50), "1-D"),
    (np.zeros((20, 20, 5)), "5 channels"),
    (np.zeros((8, 8)), "smallest supported"),
    (np.zeros((2, 20, 20, 3)), "one 2D slice"),
])
def test_bad_shapes_name_the_problem(bad, words):
    with pytest.raises(ValueError, match=words):
        to_rgb8(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_are_refused(value):
    arr = np.zeros((20, 20), np.float32)
    arr[3, 3] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb8(arr)


def test_16_bit_rgb_uses_one_window_for_all_channels():
    """The colour balance survives: a channel at half the intensity of another stays half."""
    rng = np.random.default_rng(0)
    base = rng.integers(1000, 60000, (64, 64)).astype(np.float64)
    rgb = np.stack([base, base / 2, base / 4], -1).astype(np.uint16)
    out = to_rgb8(rgb).astype(float)
    bright = out[..., 0] > 100
    assert np.allclose(out[..., 1][bright] / out[..., 0][bright], 0.5, atol=0.05)
    assert np.allclose(out[..., 2][bright] / out[..., 0][bright], 0.25, atol=0.05)
