"""Which packages the wheel holds; everything else is in pyproject.toml.

Every package under napari_vlsm/ is found, data folders included (as namespace packages), so a new sub-package
cannot be left out of the wheel as napari_vlsm.core's were (issue 40). sample_data/ lies outside napari_vlsm/ and
installs as napari_vlsm.sample_data (pyproject.toml's package-dir): [tool.setuptools.packages.find] cannot name it,
and a `packages` list in pyproject.toml would replace this one. The data files themselves are those MANIFEST.in
names (include-package-data). tests/test_packaging.py checks the wheel holds every tracked file of the package.
"""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["napari_vlsm", "napari_vlsm.*"])
      + ["napari_vlsm.sample_data", "napari_vlsm.sample_data.masks"])
