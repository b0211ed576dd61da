"""The model families napari-vlsm knows, registered at one place.

Each family module (``clipseg.py``, ``film_unet.py``, ...) ends with one ``FAMILY = Family(...)``
that says everything the rest of the project needs about it: the ``model_type`` its
config.json holds, how a folder of it loads, how a fresh one is made for ``new:KEY`` specs,
which training modes it has, whether correction adapters exist for it, what its ONNX export
needs, and a builder of a tiny random model for tests and benchmarks. Loading, the model
listing, ONNX export, ``finetune`` and the test fixtures look the spec up here, as Segment
Anything's ``sam_model_registry`` or transformers' auto classes do.

A new family is one module plus one line in ``FAMILY_MODULES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Callable

from napari_vlsm.core.errors import ModelNotFoundError
from napari_vlsm.core.models.train_modes import TRAIN_MODES

# the one registry line per family: the module (in this package) that defines its FAMILY
FAMILY_MODULES = ("film_unet", "clipseg", "biomedclipseg", "cris")
NEW_PREFIX = "new:"


@dataclass(frozen=True)
class Family:
    model_type: str                    # config.json's "model_type"
    name: str                          # shown in listings and messages
    load: Callable                     # (folder, device, dtype, source) -> TorchBackend
    build_random: Callable             # (folder, seed=0) -> folder: a tiny random model, offline
    onnx_meta: Callable                # (backend) -> dict of preprocessing settings for vlsm_onnx.json
    new: Callable | None = None        # (device, encoders, seed) -> a fresh backend for "new:KEY"
    new_key: str | None = None         # the KEY of "new:KEY" (None: no fresh start for this family)
    new_help: str = ""                 # what "new:KEY" starts from, for the CLI's help
    new_needs_encoders: bool = False   # "new:KEY" reads pretrained encoders from --encoders
    train_modes: tuple = TRAIN_MODES
    adapters: bool = False             # correction adapters (a path of its own per new class)
    clicks: bool = False               # models of it can take clicks and a box (config "guidance")
    extra: dict = field(default_factory=dict)

    @property
    def new_spec(self) -> str | None:
        return NEW_PREFIX + self.new_key if self.new_key else None


def families() -> list[Family]:
    """Every registered family, in registry order (the embedded default's first)."""
    return [import_module(f"{__package__}.{name}").FAMILY for name in FAMILY_MODULES]


def family_of(model_type: str | None) -> Family | None:
    return next((f for f in families() if f.model_type == model_type), None)


def family_named(name: str) -> Family:
    """The family whose name, model_type or new key is ``name`` (any case)."""
    key = name.casefold()
    for f in families():
        if key in {f.name.casefold(), f.model_type.casefold(), (f.new_key or "").casefold()}:
            return f
    raise ValueError(f"Unknown model family {name!r}; napari-vlsm has {supported_text()}.")


def family_of_backend(backend) -> Family | None:
    config = getattr(getattr(backend, "module", None), "config", None)
    return family_of(getattr(config, "model_type", None))


def supported_text() -> str:
    return ", ".join(f"{f.name} ({f.model_type!r})" for f in families())


def new_specs() -> dict[str, Family]:
    """'new:KEY' -> its family, for the families that can start fresh."""
    return {f.new_spec: f for f in families() if f.new_spec}


def load_folder(folder: Path, model_type: str | None, device, dtype, source: str):
    family = family_of(model_type)
    if family is None:
        raise ModelNotFoundError(f"{folder} holds a {model_type!r} model; napari-vlsm supports {supported_text()}.")
    return family.load(folder, device, dtype, source)


def new_backend(spec: str, device="auto", encoders=None, seed: int = 0):
    """A fresh model for a 'new:KEY' spec."""
    specs = new_specs()
    if spec not in specs:
        raise ModelNotFoundError(f"Unknown {spec!r}; fresh models are: {', '.join(specs)}.")
    family = specs[spec]
    if encoders is not None and not family.new_needs_encoders:
        raise ModelNotFoundError(f"{spec} starts from scratch and takes no encoders=; encoders= goes with "
                                 f"{', '.join(s for s, f in specs.items() if f.new_needs_encoders)}.")
    return family.new(device, encoders, seed)
