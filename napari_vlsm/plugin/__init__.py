"""The napari face: the npe2 manifest (napari.yaml), dock widgets (layout and wiring), the
segmentation session they drive, the state they share per viewer (``state.py``), label
writing, sample data, reader and writers. Work is done by ``napari_vlsm.core``."""
