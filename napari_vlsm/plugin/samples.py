"""Sample data: real colonoscopy frames, a breast ultrasound image, a dermoscopy photo, a chest X-ray and a fetal
head ultrasound image shipped with the package, and medical images that installed packages carry offline
(scikit-image's retina, pydicom's CT and MR)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np

from napari_vlsm.core.images.imageio import read_image


def _sample_dir() -> Path:
    return Path(str(files("napari_vlsm.sample_data")))


def colonoscopy_frames() -> list[Path]:
    return sorted(p for p in _sample_dir().glob("*.jpg") if p.name.startswith(("kvasir_seg", "clinicdb")))


def _frame(prefix: str, targets: tuple[str, ...] = ("",)):
    """The sample image whose name starts with ``prefix`` and its ground truth: one label value
    per target, from masks/<name>.png or, for an image of several targets, masks/<name>_<target>.png."""
    path = next(p for p in sorted(_sample_dir().glob("*.jpg")) if p.name.startswith(prefix))
    image = read_image(path)
    layers = [(image, {"name": path.stem, "rgb": image.ndim == 3}, "image")]
    truth = np.zeros(image.shape[:2], np.uint8)
    for value, target in enumerate(targets, 1):
        mask = _sample_dir() / "masks" / f"{path.stem}{'_' + target if target else ''}.png"
        if mask.exists():
            truth[read_image(mask) > 127] = value
    if truth.any():
        layers.append((truth, {"name": f"{path.stem} ground truth", "visible": False}, "labels"))
    return layers


def kvasir_polyp():
    return _frame("kvasir_seg")


def clinicdb_polyp():
    return _frame("clinicdb")


def breast_ultrasound():
    return _frame("busi")


def skin_lesion():
    return _frame("isic")


def chest_xray():
    """A COVID-19 chest X-ray; its ground truth holds the lungs (1) and the infection (2)."""
    return _frame("chest_xray", ("lungs", "infection"))


def fetal_head():
    return _frame("fetal_head")


def colonoscopy_stack():
    """All sample frames as one (N, 256, 256, 3) stack, to try segmenting every slice."""
    frames = [read_image(p) for p in colonoscopy_frames()]
    return [(np.stack(frames), {"name": "colonoscopy frames", "rgb": True}, "image")]


def retina_fundus():
    from skimage import data

    return [(data.retina(), {"name": "retina fundus (scikit-image)", "rgb": True}, "image")]


def _dicom(name: str, label: str):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    return [(ds.pixel_array, {"name": label, "colormap": "gray"}, "image")]


def ct_slice():
    return _dicom("CT_small.dcm", "CT slice (pydicom test file)")


def mr_slice():
    return _dicom("MR_small.dcm", "MR slice (pydicom test file)")
