"""Reader and writers: TIFF images through tifffile; label masks as PNG or TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_vlsm.core.images.imageio import read_image, write_mask


def get_reader(path):
    if isinstance(path, list):
        return None
    if str(path).lower().endswith((".tif", ".tiff")):
        return read_tiff
    return None


def read_tiff(path):
    data = read_image(path)
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4) and data.dtype == np.uint8
    return [(data, {"name": Path(path).stem, "rgb": rgb}, "image")]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write a Labels layer as PNG (2D) or TIFF (any dimensionality)."""
    data = np.asarray(data)
    if data.ndim != 2 and not path.lower().endswith((".tif", ".tiff")):
        raise ValueError(f"A {data.ndim}D Labels layer can only be saved as TIFF; use a .tif name.")
    return [str(write_mask(path, data))]


def write_image_tiff(path: str, data, meta: dict) -> list[str]:
    import tifffile

    tifffile.imwrite(path, np.asarray(data), compression="zlib")
    return [path]
