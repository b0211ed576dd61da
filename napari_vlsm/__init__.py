"""napari-vlsm: text-prompted segmentation of 2D medical images with vision-language models."""

__version__ = "0.1.0"
