"""CRIS (CLIP-Driven Referring Image Segmentation) as the medvlsm benchmark builds it: the
network and its cached image / per-prompt split (``model.py``), and the converter of a CRIS
release checkpoint (``convert.py``). Registered as a family here."""

from __future__ import annotations

from pathlib import Path

import torch

from napari_vlsm.core.models.cris.model import CrisBackend, CrisConfig, build_random_cris, load
from napari_vlsm.core.models.backend import resize_normalize_meta
from napari_vlsm.core.models.families import Family
from napari_vlsm.core.models.train_modes import TRAIN_MODES


def new_cris(device="auto", encoders=None, seed: int = 0) -> CrisBackend:
    """A CRIS to finetune, in fp32: ``encoders`` is a CRIS release checkpoint file (read once,
    in memory, tensors only) or a converted CRIS folder. Every weight comes from it (CRIS is
    finetuned whole from its RefCOCO training, as the benchmark does), so ``seed`` is unused."""
    from napari_vlsm.core.device import pick_device
    from napari_vlsm.core.errors import ModelNotFoundError

    if encoders is None:
        raise ModelNotFoundError("new:cris needs encoders=CKPT: a CRIS release checkpoint (CRIS.pytorch's "
                                 "best_model.pth for RN50) or a folder made by napari-vlsm models convert-cris.")
    path = Path(encoders).expanduser()
    if path.is_dir():
        backend = load(path, pick_device(device), torch.float32, str(path))
    elif path.is_file():
        from napari_vlsm.core.models.cris.convert import backend_from_checkpoint

        backend = backend_from_checkpoint(path, device=pick_device(device))
    else:
        raise ModelNotFoundError(f"No CRIS checkpoint or folder at {path}.")
    backend.source = "new:cris"
    return backend


FAMILY = Family(model_type=CrisConfig.model_type, name=CrisBackend.name, load=load, build_random=build_random_cris,
                onnx_meta=resize_normalize_meta, new=new_cris, new_key="cris",
                new_help="CRIS (CLIP RN50) from a release checkpoint (encoders=CKPT)", new_needs_encoders=True,
                train_modes=TRAIN_MODES, adapters=False)
