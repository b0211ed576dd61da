"""The public path ``napari_vlsm.core.loading`` the README documents; the code is in
``core/models/loading.py``."""

from napari_vlsm.core.models.loading import load_model, resolve_folder  # noqa: F401
