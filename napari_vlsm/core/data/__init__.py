"""Words and examples: prompt building, training sets, concepts and negatives, the replay sample.

Layers, lowest first: core/ (errors, files, devices) < images < data < models < inference <
training; a module imports only from its own layer or below (tests/test_structure.py)."""
