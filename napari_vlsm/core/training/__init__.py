"""Finetuning: the settings and the loop, validation, checkpoints, correction adapters, weight averaging.

Layers, lowest first: core/ (errors, files, devices) < images < data < models < inference <
training; a module imports only from its own layer or below (tests/test_structure.py)."""
