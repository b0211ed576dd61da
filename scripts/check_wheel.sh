#!/usr/bin/env bash
# Install napari-vlsm the way a user does, from a wheel (not editable), and use it outside the checkout.
#
# Builds the sdist and, from it, the wheel (python -m build with the project's .venv, which has build and setuptools),
# checks both hold every tracked file of the package, makes a fresh venv in a temporary folder, installs torch there
# first (pinned, as scripts/setup.sh does) and then the wheel file with its test extra, and from that folder, where
# the checkout is not on sys.path, runs: napari-vlsm --help, segment with the default model, models families, npe2's
# discovery of the plugin (the manifest validates, every python_name imports), and a few tests copied from tests/
# against the installed package. CI runs it after the suite (.ci/run). Issue 40: a wheel without napari_vlsm.core's
# sub-packages installed a package that could not load a model, while every test passed on the editable install.
#
# Env: PYTHON (interpreter for the fresh venv, default python3), TORCH_VERSION and TORCH_PIP_ARGS as in
# scripts/setup.sh, BUILD_PYTHON (default .venv/bin/python), KEEP=1 keeps the temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BUILD_PY=${BUILD_PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$BUILD_PY" ]; then
  echo "check_wheel: $BUILD_PY is missing: run scripts/setup.sh first" >&2
  exit 1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/napari-vlsm-wheel.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "check_wheel: kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
start=$SECONDS
step() { echo "== check_wheel [$((SECONDS - start)) s] $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

step "building the sdist, then the wheel from it"
if ! "$BUILD_PY" -m build --no-isolation --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log" >&2
  fail "python -m build"
fi
wheels=("$WORK"/dist/napari_vlsm-*-py3-none-any.whl)
sdists=("$WORK"/dist/napari_vlsm-*.tar.gz)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || fail "expected one wheel in $WORK/dist: $(ls "$WORK/dist")"
[ ${#sdists[@]} -eq 1 ] && [ -f "${sdists[0]}" ] || fail "expected one sdist in $WORK/dist: $(ls "$WORK/dist")"
WHEEL=${wheels[0]}
SDIST=${sdists[0]}
echo "$(basename "$WHEEL") $(du -h "$WHEEL" | cut -f1), $(basename "$SDIST") $(du -h "$SDIST" | cut -f1)"

step "comparing the wheel and the sdist with git ls-files"
git ls-files -z napari_vlsm sample_data tests >"$WORK/tracked"
"$BUILD_PY" - "$WHEEL" "$SDIST" "$WORK/tracked" <<'EOF'
import sys, tarfile, zipfile
wheel, sdist, tracked = sys.argv[1:]
files = [f for f in open(tracked).read().split("\0") if f]
assert any(f.startswith("napari_vlsm/") for f in files), "git lists no file under napari_vlsm/"
in_wheel = set(zipfile.ZipFile(wheel).namelist())
# sample_data/ installs as napari_vlsm.sample_data; tests/ goes into the sdist only
want = {f if f.startswith("napari_vlsm/") else "napari_vlsm/" + f for f in files if not f.startswith("tests/")}
missing = sorted(want - in_wheel)
assert not missing, f"{len(missing)} tracked files are not in the wheel: {missing[:20]}"
stray = sorted(t for t in {n.split("/")[0] for n in in_wheel} if t != "napari_vlsm" and not t.endswith(".dist-info"))
assert not stray, f"the wheel installs more than napari_vlsm: {stray}"
with tarfile.open(sdist) as t:
    in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
missing = sorted(set(files) - in_sdist)
assert not missing, f"{len(missing)} tracked files are not in the sdist: {missing[:20]}"
print(f"wheel: {len(want)} tracked files of {len(in_wheel)}; sdist: {len(files)} tracked files of the package and tests")
EOF

step "a fresh venv, torch==${TORCH_VERSION:-2.13.0} and then the wheel with its test extra"
"${PYTHON:-python3}" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
pip_() {  # pip's output only when it fails
  "$VPY" -m pip "$@" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; fail "pip $*"; }
}
pip_ install -q --upgrade pip
# torch first, pinned, as in scripts/setup.sh: an unpinned torch would pull a CUDA build of several GB
# shellcheck disable=SC2086
pip_ install -q ${TORCH_PIP_ARGS:-} "torch==${TORCH_VERSION:-2.13.0}"
pip_ install -q "$WHEEL[test]"
pip_ check
"$VPY" -m pip list 2>/dev/null | grep -E "^(napari-vlsm|napari|torch|npe2) " || true

# From here on in a folder outside the checkout, so only the installed package can be imported
mkdir -p "$WORK/run"
cd "$WORK/run"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PATH="$WORK/venv/bin:$PATH"
unset PYTHONPATH

step "the installed package is the one imported, with its sub-packages and data"
"$VPY" - "$REPO" <<'EOF'
import sys, sysconfig
from importlib.resources import files
from pathlib import Path
site = Path(sysconfig.get_paths()["purelib"]).resolve()
repo = Path(sys.argv[1]).resolve()
assert not any(Path(p or ".").resolve() in (repo, repo.parent) for p in sys.path), sys.path
import napari_vlsm
where = Path(napari_vlsm.__file__).resolve()
assert site in where.parents, f"napari_vlsm is imported from {where}, not from {site}"
from napari_vlsm.core.loading import load_model  # noqa: F401  (issue 40: ModuleNotFoundError)
from napari_vlsm.core.models.loading import default_model_dir
import napari_vlsm.core.training.train, napari_vlsm.core.inference.series, napari_vlsm.core.data.replay  # noqa
assert site in default_model_dir().resolve().parents, default_model_dir()
assert (default_model_dir() / "model.safetensors").is_file()
assert (files("napari_vlsm.plugin") / "napari.yaml").is_file()
samples = Path(str(files("napari_vlsm.sample_data")))
assert site in samples.resolve().parents and len(list(samples.glob("*.jpg"))) >= 6 and list(samples.glob("masks/*.png"))
print(f"napari_vlsm {napari_vlsm.__version__} from {where.parent}")
EOF

step "napari-vlsm --help"
napari-vlsm --help >"$WORK/help.txt" || { cat "$WORK/help.txt" >&2; fail "napari-vlsm --help"; }
grep -q segment "$WORK/help.txt" || fail "napari-vlsm --help does not list segment"

step "napari-vlsm segment, with the default model, a sample frame the wheel installed"
image=$("$VPY" -c "from importlib.resources import files; from pathlib import Path
print(sorted(Path(str(files('napari_vlsm.sample_data'))).glob('kvasir_seg_*.jpg'))[0])")
napari-vlsm segment "$image" -p polyp -o "$WORK/masks"
mask="$WORK/masks/$(basename "${image%.*}").png"
[ -s "$mask" ] || fail "segment wrote no $mask: $(ls "$WORK/masks")"
[ -s "$WORK/masks/labels.json" ] || fail "segment wrote no labels.json"
"$VPY" - "$image" "$mask" <<'EOF'
import sys
from napari_vlsm.core.images.imageio import read_image
image, mask = read_image(sys.argv[1]), read_image(sys.argv[2])
assert mask.shape == image.shape[:2], (mask.shape, image.shape)
assert 0 < (mask > 0).mean() < 0.9, f"the default model's polyp mask covers {(mask > 0).mean():.1%} of the frame"
print(f"mask {mask.shape}, {(mask > 0).mean():.1%} polyp")
EOF

step "napari-vlsm models families"
napari-vlsm models families

step "npe2 finds the plugin: the manifest validates and every python_name imports"
npe2 validate napari-vlsm --imports
"$VPY" - <<'EOF'
import sys, sysconfig
from pathlib import Path
from npe2 import PluginManager
from npe2.manifest.utils import import_python_name
site = Path(sysconfig.get_paths()["purelib"]).resolve()
pm = PluginManager.instance()
pm.discover()
mf = pm.get_manifest("napari-vlsm")
c = mf.contributions
assert mf.package_metadata is not None and mf.package_metadata.version == "0.1.0", mf.package_metadata
names = [cmd.python_name for cmd in c.commands if cmd.python_name]
assert len(names) == len(c.commands), "a command without python_name"
for name in names:
    obj = import_python_name(name)
    module = Path(sys.modules[obj.__module__].__file__).resolve()
    assert site in module.parents, f"{name} comes from {module}"
ids = {cmd.id for cmd in c.commands}
for contrib in [*c.widgets, *c.readers, *c.writers, *c.sample_data]:
    assert contrib.command in ids, f"{contrib} names no command of the manifest"
print(f"{len(names)} commands import; widgets: {', '.join(w.display_name for w in c.widgets)}; "
      f"samples: {', '.join(s.key for s in c.sample_data)}")
EOF

step "a few tests, copied from tests/, against the installed package"
mkdir -p "$WORK/run/proj"
cp -r "$REPO/tests" "$REPO/sample_data" "$REPO/pyproject.toml" "$WORK/run/proj/"
cat >"$WORK/run/proj/tests/test_installed_wheel.py" <<'EOF'
"""Written by scripts/check_wheel.sh: the tests beside it ran against the installed wheel."""
import sysconfig
from pathlib import Path


def test_napari_vlsm_is_the_installed_wheel():
    import napari_vlsm
    import napari_vlsm.core.inference.predictor as predictor

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for module in (napari_vlsm, predictor):
        assert site in Path(module.__file__).resolve().parents, module.__file__
EOF
cd "$WORK/run/proj"
# QT_QPA_PLATFORM stays as the environment has it: pytest-xvfb starts Xvfb for the viewer tests
"$VPY" -m pytest -q -p no:cacheprovider tests/test_installed_wheel.py tests/test_manifest.py tests/test_predictor.py \
  tests/test_default_model.py::test_default_is_the_small_offline_model_with_its_card_and_replay_sample \
  tests/test_default_model.py::test_finds_polyps_and_the_tumour_in_real_images \
  tests/test_default_model.py::test_demo_without_viewer_writes_the_mask

step "passed: the wheel installs and works outside the checkout"
