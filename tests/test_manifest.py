"""npe2 manifest, sample data, reader and writer."""

import subprocess
import sys

import numpy as np
import pytest


def test_manifest_validates():
    res = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-vlsm"], capture_output=True, text=True)
    assert res.returncode == 0 and "valid" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("key", ["kvasir_polyp", "clinicdb_polyp", "breast_ultrasound", "colonoscopy_stack",
                                 "retina_fundus",
                                 "ct_slice", "mr_slice"])
def test_each_sample_opens_offline(make_napari_viewer, key):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-vlsm", key)
    image = layers[0]
    assert image.data.size > 0 and image.data.ndim >= 2
    if key in ("kvasir_polyp", "clinicdb_polyp", "breast_ultrasound", "retina_fundus"):
        assert image.rgb
    if key in ("ct_slice", "mr_slice"):
        assert image.data.dtype == np.int16


def test_tiff_reader_and_label_writers(make_napari_viewer, tmp_path):
    import tifffile

    stack = (np.random.default_rng(0).random((3, 40, 50)) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "stack.tif"), plugin="napari-vlsm")
    np.testing.assert_array_equal(layer.data, stack)
    labels = viewer.add_labels(np.eye(40, 50, dtype=np.uint8) * 3, name="lab")
    from napari_vlsm.plugin.reader_writer import write_labels

    write_labels(str(tmp_path / "lab.png"), labels.data, {})
    from napari_vlsm.core.images.imageio import read_image

    np.testing.assert_array_equal(read_image(tmp_path / "lab.png"), labels.data)
    with pytest.raises(ValueError, match="TIFF"):
        write_labels(str(tmp_path / "vol.png"), np.zeros((2, 4, 4), np.uint8), {})
    write_labels(str(tmp_path / "vol.tif"), np.ones((2, 4, 4), np.uint16), {})
    assert tifffile.imread(tmp_path / "vol.tif").shape == (2, 4, 4)
