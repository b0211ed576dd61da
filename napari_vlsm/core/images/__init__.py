"""Arrays in and out: reading images and masks, the model's input, logits to labels, mask edits, metrics.

Layers, lowest first: core/ (errors, files, devices) < images < data < models < inference <
training; a module imports only from its own layer or below (tests/test_structure.py)."""
