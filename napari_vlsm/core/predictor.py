"""The public path ``napari_vlsm.core.predictor`` the README documents; the code is in
``core/inference/predictor.py``."""

from napari_vlsm.core.inference.predictor import Prediction, Predictor  # noqa: F401
