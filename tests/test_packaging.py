"""The wheel holds the whole package: every module and sub-package of napari_vlsm, the napari manifest, the default
model's and the tokenizer's files, and sample_data/ as napari_vlsm.sample_data (issue 40: a wheel without
napari_vlsm.core's sub-packages installed a package that could not load a model). scripts/check_wheel.sh installs
such a wheel in a fresh environment and uses it; this test only builds it and reads its list of files."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked(*folders: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *folders], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: " + out.stderr.strip())
    return [p for p in out.stdout.split("\0") if p]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """Names in a wheel built from this checkout (no isolation: the environment's setuptools, a few seconds)."""
    pytest.importorskip("setuptools", minversion="77", reason="pyproject.toml's build-system needs setuptools>=77")
    out = tmp_path_factory.mktemp("wheel")
    # a copy of the tracked files, so that the build writes no build/ or egg-info into the checkout and an
    # untracked file lying in the checkout cannot stand in for a tracked one that the configuration misses
    src = out / "src"
    for name in tracked():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", "-q", "-w", str(out / "dist")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (out / "dist").glob("napari_vlsm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_every_tracked_file_of_the_package_is_in_the_wheel(wheel_files):
    # sample_data/ installs as napari_vlsm.sample_data (pyproject.toml's package-dir)
    wanted = {name if name.startswith("napari_vlsm/") else f"napari_vlsm/{name}"
              for name in tracked("napari_vlsm", "sample_data")}
    assert wanted, "git lists no file under napari_vlsm/"
    missing = sorted(wanted - wheel_files)
    assert not missing, f"{len(missing)} tracked files are not in the wheel: {missing[:20]}"


def test_each_sub_package_and_the_files_napari_and_the_default_model_need_are_there(wheel_files):
    for name in ("napari_vlsm/core/loading.py", "napari_vlsm/core/models/__init__.py",
                 "napari_vlsm/core/images/__init__.py", "napari_vlsm/core/data/__init__.py",
                 "napari_vlsm/core/inference/__init__.py", "napari_vlsm/core/training/__init__.py",
                 "napari_vlsm/plugin/napari.yaml", "napari_vlsm/assets/default_film_unet/model.safetensors",
                 "napari_vlsm/assets/default_film_unet/vlsm_card.json",
                 "napari_vlsm/assets/default_film_unet/replay/anns/train.json",
                 "napari_vlsm/assets/clip_tokenizer/vocab.json", "napari_vlsm/sample_data/__init__.py",
                 "napari_vlsm/sample_data/masks/clinicdb_27.png"):
        assert name in wheel_files, name


def test_the_wheel_holds_nothing_outside_the_package(wheel_files):
    # no stray top-level package (sample_data, tests), and no byte code
    tops = {n.split("/")[0] for n in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"napari_vlsm"}, sorted(tops)
    assert not [n for n in wheel_files if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
