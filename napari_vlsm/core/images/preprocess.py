"""Turn any supported 2D image array into the 8-bit RGB the models expect.

Intensity normalisation (documented in docs/usage.md):

* ``uint8``: used as is.
* ``bool``: False -> 0, True -> 255.
* ``float`` with every value inside [0, 1]: multiplied by 255.
* any other ``float``, ``uint16``, ``int16`` or other integer type: a percentile window,
  the 0.5th to 99.5th percentile of all channels together, is stretched to 0-255 and
  values outside it are clipped. One window for all channels keeps the colour balance.
  A constant image becomes black. float64 values beyond float32's range (1e300, 1e-300)
  are scaled first, which does not change the window's result.

Layouts: (H, W) grayscale and (H, W, 1) are repeated to three channels; (H, W, 3) is RGB;
(H, W, 4) is RGBA and the alpha channel is dropped.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the models' input normalisation (CLIPSeg, FiLM-UNet)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 16
WINDOW_PERCENTILES = (0.5, 99.5)


def validate_image(image) -> np.ndarray:
    """Return ``image`` as an ndarray or raise ``ValueError`` naming what is wrong."""
    if image is None:
        raise ValueError("No image was given; pass a 2D array of shape (H, W) or (H, W, C).")
    arr = np.asarray(image)
    if arr.ndim == 0:
        raise ValueError(f"The image is a single value ({arr!r}), not a 2D array; give shape (H, W) or (H, W, C).")
    if arr.size == 0:
        raise ValueError(f"The image is empty (shape {arr.shape}); give a 2D image with pixels in it.")
    if arr.ndim == 1:
        raise ValueError(f"The image is 1-D (shape {arr.shape}); give a 2D image of shape (H, W) or (H, W, C).")
    if arr.ndim > 3:
        raise ValueError(
            f"The image has shape {arr.shape}; give one 2D slice, (H, W) or (H, W, C). "
            "For a stack, segment one slice at a time."
        )
    if arr.ndim == 3 and arr.shape[-1] > 4 and arr.shape[0] < arr.shape[-1]:  # (N, H, W): planes first
        raise ValueError(
            f"The image has shape {arr.shape}: {arr.shape[0]} planes of {arr.shape[1]}x{arr.shape[2]} (a stack, or "
            "channels first), not an (H, W, C) image with at most 4 channels. Pick one slice; if channels "
            "come first, move them last."
        )
    if arr.ndim == 3 and arr.shape[-1] > 4:
        raise ValueError(
            f"The image has {arr.shape[-1]} channels (shape {arr.shape}); at most 4 (RGBA) are supported. "
            "If this is a stack, pick one slice; if channels come first, move them last."
        )
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"Images of dtype {arr.dtype} are not supported; use an integer or float array.")
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"The image is {h}x{w} pixels; the smallest supported is {MIN_SIDE}x{MIN_SIDE}.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(
            "The image contains NaN or infinite values; replace them first (for example numpy.nan_to_num)."
        )
    return arr


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map intensities to uint8 as described in the module docstring."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f" and arr.min() >= 0.0 and arr.max() <= 1.0:
        return np.round(arr.astype(np.float32, copy=False) * 255.0).astype(np.uint8)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:  # float64 may lie beyond float32 (1e300, 1e-300):
        top = float(np.abs(arr).max())                  # scaled first, which the window does not depend on
        arr = arr / top if top > 0 else arr
    data = arr.astype(np.float32, copy=False)
    lo, hi = np.percentile(data, WINDOW_PERCENTILES)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    scaled = (np.clip(data, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(scaled).astype(np.uint8)


def shrink_for_model(arr: np.ndarray, model_side: int) -> np.ndarray:
    """Box-average an image far larger than the model sees down to about twice its input
    side, keeping the dtype, before any full-size copy is made. The model looks at a few
    hundred pixels a side; a 12000 x 12000 slide would otherwise be copied to float at full
    size several times over. Percentile windows are then taken on the block means."""
    h, w = arr.shape[:2]
    if min(h, w) < 8 * model_side:  # small enough: the model's own resize sees every pixel
        return arr
    factor = min(h, w) // (2 * model_side)
    oh, ow = h // factor, w // factor
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[-1] in (3, 4)):
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).reduce(factor))[:oh, :ow]
    squeeze = arr.ndim == 2
    src = arr[..., None] if squeeze else arr
    wide = np.float64 if arr.dtype.kind == "f" and arr.dtype.itemsize > 4 else np.float32  # float64 stays float64
    out = np.empty((oh, ow, src.shape[-1]), wide)
    rows = max(1, 2**24 // (factor * factor * ow * src.shape[-1]))  # about 64 MB of float32 at a time
    for r in range(0, oh, rows):
        block = src[r * factor:min(oh, r + rows) * factor, :ow * factor].astype(wide)
        out[r:r + rows] = block.reshape(-1, factor, ow, factor, src.shape[-1]).mean(axis=(1, 3))
    if arr.dtype.kind in "biu":
        out = np.round(out).astype(arr.dtype) if arr.dtype != bool else out >= 0.5
    return out[..., 0] if squeeze else out


def to_rgb8(image) -> np.ndarray:
    """Validate and convert one 2D image to a contiguous (H, W, 3) uint8 array."""
    arr = validate_image(image)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[-1] == 2:
        arr = arr[..., :1]  # grayscale + alpha
    arr = to_uint8(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def resize_normalize(images: list[np.ndarray], size: tuple[int, int], mean, std, device="cpu"):
    """(H, W, 3) uint8 images -> (N, 3, *size) float32: antialiased bilinear resize, then mean/std."""
    import torch
    import torch.nn.functional as F

    out = []
    for image in images:
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float() / 255.0
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    x = torch.cat(out)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
