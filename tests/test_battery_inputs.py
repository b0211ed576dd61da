"""Fault battery (issue 39), inputs: images and masks that are too big, coloured or out of
range are refused or read as meant, with a clear message."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_vlsm.core.images.imageio import read_image
from tests.conftest import cli



def tiff_bomb(path, side=16384):
    """A small file (zlib tiles of zeros, ~0.5 MB) that decodes to side x side pixels."""
    tile = np.zeros((1024, 1024), np.uint8)
    n = (side // 1024) ** 2
    tifffile.imwrite(path, (tile for _ in range(n)), shape=(side, side), dtype="uint8", tile=(1024, 1024),
                     compression="zlib")
    return path


def test_a_tiff_bomb_is_refused_from_its_tags_before_decoding(tmp_path, monkeypatch):
    bomb = tiff_bomb(tmp_path / "bomb.tif")
    assert bomb.stat().st_size < 2_000_000 and 16384 ** 2 > 2 * Image.MAX_IMAGE_PIXELS

    def decoded(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", decoded)
    with pytest.raises(ValueError, match=r"bomb.tif would decode to 16384x16384 \(268435456 pixels\), more than"):
        read_image(bomb)


def test_every_reader_has_the_same_pixel_limit(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50 * 50)  # the limit: 2 x 2500 pixels
    image = np.zeros((80, 80, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    tifffile.imwrite(tmp_path / "big.tif", image)
    tifffile.imwrite(tmp_path / "ok.tif", image[:70, :70])
    with pytest.raises(PILImage.DecompressionBombError):
        read_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match="80x80x3 .6400 pixels., more than the 5000 pixels"):
        read_image(tmp_path / "big.tif")
    assert read_image(tmp_path / "ok.tif").shape == (70, 70, 3)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 50, 50), np.uint8))  # 12500 pixels in all
    with pytest.raises(ValueError, match="5x50x50"):
        read_image(tmp_path / "stack.tif")


def test_segment_skips_a_tiff_bomb_with_a_message(tiny_unet, tmp_path, polyp_image):
    folder = tmp_path / "in"
    folder.mkdir()
    tiff_bomb(folder / "bomb.tif")
    Image.fromarray(polyp_image).save(folder / "a.png")
    res = cli("segment", folder, "-p", "polyp", "-m", tiny_unet, "-o", tmp_path / "out")
    assert res.exit_code == 1 and "1 segmented" in res.output
    assert "decompression bomb" in " ".join(res.output.split())


def _example(tmp_path, mask_path):
    from napari_vlsm.core.data.training_sets import Example

    image = np.full((40, 50, 3), 90, np.uint8)
    return Example(image, mask_path, {"p1": "polyp"}, name=mask_path.name)


def _object():
    truth = np.zeros((40, 50), bool)
    truth[10:20, 5:30] = True
    return truth


def test_a_colour_mask_is_read_over_all_channels_with_a_warning(tmp_path):
    from napari_vlsm.core.images import imageio

    getattr(imageio, "_WARNED_COLOUR", set()).clear()  # warned once per folder
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[_object()] = (0, 200, 0)  # a green object: nothing in the red channel
    rgb[0, 0] = (0, 0, 255)       # and one blue pixel
    Image.fromarray(rgb).save(tmp_path / "green.png")
    with pytest.warns(UserWarning, match="green.png is a colour mask: read as the object wherever a pixel is not"):
        _, fg = _example(tmp_path, tmp_path / "green.png").load()
    expected = _object()
    expected[0, 0] = True
    assert np.array_equal(fg, expected)


def test_grey_masks_stored_as_rgb_or_rgba_read_as_their_grey(tmp_path):
    import warnings

    grey = (_object() * 255).astype(np.uint8)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)])).save(tmp_path / "rgba.png")
    alpha = np.zeros((40, 50, 4), np.uint8)
    alpha[..., 3] = grey  # black everywhere, the object drawn in the alpha channel
    Image.fromarray(alpha).save(tmp_path / "alpha.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("rgb.png", "rgba.png", "alpha.png"):
            assert np.array_equal(_example(tmp_path, tmp_path / name).load()[1], _object()), name


def test_a_palette_mask_is_read_by_index_not_colour(tmp_path):
    index = _object().astype(np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 (background) white, index 1 black
    im.save(tmp_path / "palette.png")
    assert np.array_equal(_example(tmp_path, tmp_path / "palette.png").load()[1], _object())


def test_float64_beyond_float32_is_windowed_without_warnings(tmp_path):
    import warnings

    from napari_vlsm.core.images.preprocess import to_rgb8

    values = np.random.default_rng(0).random((64, 80))
    for offset in (0.0, -0.5):
        tifffile.imwrite(tmp_path / "far.tif", (values + offset) * 1e300)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rgb = to_rgb8(read_image(tmp_path / "far.tif"))
        assert np.array_equal(rgb, to_rgb8((values * 1000).astype(np.float64))), offset
        assert rgb.std() > 50  # not black
