"""Reading images and writing label masks (PNG/JPEG through Pillow, TIFF through tifffile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_vlsm.core.atomic import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff")


def pixel_limit() -> int | None:
    """The most pixels one image may decode to: Pillow's limit for a decompression bomb
    (twice ``Image.MAX_IMAGE_PIXELS``, which Pillow only warns about), for every reader."""
    from PIL import Image

    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def check_pixels(path: Path, shape, pixels: int) -> None:
    """Refuse (ValueError) an image of more than ``pixel_limit()`` pixels, before decoding."""
    limit = pixel_limit()
    if limit and pixels > limit:
        raise ValueError(f"{path.name} would decode to {'x'.join(map(str, shape))} ({pixels} pixels), more than "
                         f"the {limit} pixels of one image napari-vlsm reads (a decompression bomb?); it was not "
                         "decoded. Crop or downsample it first.")


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's first series, its size checked from the TIFF's tags before any pixel is decoded."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.series:
            series = tif.series[0]
            sizes = [n for n, axis in zip(series.shape, series.axes) if axis != "S"]  # S: samples of a pixel
            check_pixels(path, series.shape, int(np.prod(sizes, dtype=np.float64)))
        return np.asarray(tif.asarray())


def read_image(path) -> np.ndarray:
    """Read a 2D image as an ndarray: (H, W) or (H, W, C), in the file's own dtype. An image
    of more than ``pixel_limit()`` pixels is refused before it is decoded (ValueError)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
        elif im.mode == "LA":
            im = im.convert("L")
        return np.asarray(im)


_WARNED_COLOUR: set[str] = set()  # mask folders already warned about


def read_mask(path) -> np.ndarray:
    """A mask file as a 2D array: a grey mask as it is, a palette image as its palette indices
    (not the colours, whose background need not be black), a colour mask through
    ``flatten_mask``."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("P", "PA"):
                return np.asarray(im.getchannel(0))
    return flatten_mask(read_image(path), path)


def flatten_mask(mask: np.ndarray, path=None) -> np.ndarray:
    """A mask of several channels as one: a grey mask stored as RGB(A) as its grey; a colour
    mask as 255 wherever a pixel is not black in any colour channel, with a warning (once per
    folder) that it was read so. An alpha channel counts only where the colours are all black."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        return mask
    colour = mask[..., :3] if mask.shape[-1] == 4 else mask[..., :1] if mask.shape[-1] == 2 else mask
    if not colour.any() and colour.shape[-1] < mask.shape[-1]:  # all black: the alpha channel draws it
        return mask[..., -1]
    if all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
        return colour[..., 0]
    folder = str(Path(path).parent) if path is not None else ""
    if folder not in _WARNED_COLOUR:
        _WARNED_COLOUR.add(folder)
        import warnings

        warnings.warn(f"{Path(path).name if path is not None else 'A mask'} is a colour mask: read as the object "
                      "wherever a pixel is not black in any channel (and so are the other colour masks "
                      f"{'in ' + folder if folder else 'given'}). Save masks as grey or palette images to be sure.",
                      UserWarning, stacklevel=2)
    return ((colour != 0).any(axis=-1) * 255).astype(np.uint8)


def list_images(paths, notes: list | None = None) -> list[Path]:
    """Expand files and folders (not recursive) into a sorted list of image files. Links are
    followed for reading, wherever they point (data sets are often folders of links); what is
    left out of a folder is said in ``notes``: sub-folders, and links that are broken or loop.
    Nothing is ever written through a link (see ``folder_labeling``)."""
    found: list[Path] = []
    notes = notes if notes is not None else []
    for p in map(Path, paths):
        if not p.is_dir():
            found.append(p)
            continue
        subdirs = []
        for q in sorted(p.iterdir()):
            if q.is_symlink():
                try:
                    q.resolve(strict=True)
                except (OSError, RuntimeError):
                    notes.append(f"{q}: a broken or looping link, left out")
                    continue
            if q.is_dir():
                subdirs.append(q.name)
            elif q.suffix.lower() in IMAGE_SUFFIXES and q.is_file():
                found.append(q)
        if subdirs:
            notes.append(f"{p}: {len(subdirs)} sub-folder(s) not searched ({', '.join(subdirs[:5])}"
                         f"{', …' if len(subdirs) > 5 else ''}); name them to include them")
    return found


def write_image(path, array: np.ndarray) -> Path:
    """Write an array losslessly (PNG through Pillow, TIFF through tifffile), atomically:
    to a temporary file in the same folder, then renamed over ``path``."""
    path = Path(path)

    def write(tmp: str) -> None:
        if path.suffix.lower() == ".png":
            from PIL import Image

            Image.fromarray(array).save(tmp, format="PNG")
        else:
            import tifffile

            tifffile.imwrite(tmp, array, compression="zlib")

    return atomic_write(path, write)


def write_mask(path, labels: np.ndarray) -> Path:
    """Write a label image as PNG (8/16-bit) or TIFF."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MASK_SUFFIXES:
        raise ValueError(f"Masks are written as PNG or TIFF, not {suffix or 'no suffix'}.")
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if suffix == ".png":
        top = int(labels.max(initial=0))
        if top > 65535:
            raise ValueError("PNG masks hold at most 65535 labels; write TIFF instead.")
        labels = labels.astype(np.uint8 if top < 256 else np.uint16)
    return write_image(path, labels)
