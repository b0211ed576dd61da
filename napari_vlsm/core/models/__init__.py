"""The backend interface, the family registry, each family, ONNX export and runtime, loading and listing.

Layers, lowest first: core/ (errors, files, devices) < images < data < models < inference <
training; a module imports only from its own layer or below (tests/test_structure.py)."""
