"""The core library: no Qt, no napari. Start with ``load_model`` and ``Predictor``."""

__all__ = ["load_model", "Predictor", "Prediction"]


def __getattr__(name):  # lazy, so light modules (image IO) do not import torch
    if name == "load_model":
        from napari_vlsm.core.models.loading import load_model

        return load_model
    if name in ("Predictor", "Prediction"):
        from napari_vlsm.core.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(name)
