"""Using a loaded model: the predictor (cached image features), evaluation, folder labelling, the image series.

Layers, lowest first: core/ (errors, files, devices) < images < data < models < inference <
training; a module imports only from its own layer or below (tests/test_structure.py)."""
