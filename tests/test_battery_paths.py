"""Fault battery (issue 39), paths: names in a set's anns/*.json stay inside its images/ and
masks/ folders; the lock in --out is never written through a link."""

import json
import shutil

import pytest

from napari_vlsm.core.data.training_sets import benchmark_examples, remove_example
from tests.conftest import cli



@pytest.fixture
def data_set(tmp_path, kvasir):
    """A set of two pairs, and an image and a mask outside it."""
    entries = json.loads((kvasir / "anns" / "val.json").read_text())[:2]
    ds = tmp_path / "sets" / "ds"
    for sub in ("images", "masks", "anns"):
        (ds / sub).mkdir(parents=True)
    for e in entries:
        shutil.copy(kvasir / "images" / e["img_name"], ds / "images" / e["img_name"])
        shutil.copy(kvasir / "masks" / e["mask_name"], ds / "masks" / e["mask_name"])
    (tmp_path / "outside").mkdir()
    shutil.copy(kvasir / "images" / entries[0]["img_name"], tmp_path / "outside" / "x.jpg")
    shutil.copy(kvasir / "masks" / entries[0]["mask_name"], tmp_path / "outside" / "x.jpg.mask")
    return ds, entries


def _write(ds, entries, split="val"):
    (ds / "anns" / f"{split}.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("key, name", [
    ("img_name", "ABS"),
    ("mask_name", "../../../outside/x.jpg.mask"),
    ("mask_name", "../../../../../../../../etc/passwd"),
    ("img_name", "sub/../../masks/../../../outside/x.jpg"),
])
def test_names_that_leave_the_set_are_refused_naming_the_entry(tiny_unet, tmp_path, data_set, key, name):
    ds, entries = data_set
    name = str(tmp_path / "outside" / "x.jpg") if name == "ABS" else name
    entries[1] = {**entries[1], key: name}
    _write(ds, entries)
    with pytest.raises(ValueError, match=rf"entry 2 .* names the {key} .*not a file inside the set's"):
        benchmark_examples(ds, "val")
    res = cli("evaluate", ds, "-m", tiny_unet, "--csv", tmp_path / "s.csv")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "entry 2" in text and name in text and "names may not be absolute" in text
    assert not (tmp_path / "s.csv").exists()
    _write(ds, entries, "train")
    res = cli("finetune", ds, "-m", tiny_unet, "-o", tmp_path / "run", "--epochs", "1", "--val-split", "none")
    assert res.exit_code == 2 and "entry 2" in " ".join(res.output.split()), res.output


def test_an_entry_without_a_mask_name_is_a_message(tiny_unet, tmp_path, data_set):
    ds, entries = data_set
    del entries[0]["mask_name"]
    _write(ds, entries)
    res = cli("evaluate", ds, "-m", tiny_unet)
    assert res.exit_code == 2 and "entry 1" in res.output and "has no mask_name" in res.output


def test_links_inside_the_set_folders_may_point_elsewhere(tiny_unet, tmp_path, data_set):
    ds, entries = data_set
    (ds / "images" / "linked.jpg").symlink_to(tmp_path / "outside" / "x.jpg")
    entries.append({**entries[0], "img_name": "linked.jpg"})
    _write(ds, entries)
    assert [e.name for e in benchmark_examples(ds, "val")] == [e["img_name"] for e in entries]
    res = cli("evaluate", ds, "-m", tiny_unet, "--csv", tmp_path / "s.csv")
    assert res.exit_code == 0 and "mean Dice" in res.output, res.output


def test_removing_an_example_never_deletes_outside_the_set(tmp_path, data_set):
    ds, entries = data_set
    entries[0] = {**entries[0], "mask_name": "../../../outside/x.jpg.mask"}
    _write(ds, entries, "train")
    with pytest.raises(ValueError, match="entry 1"):
        remove_example(ds, entries[0]["img_name"])
    assert (tmp_path / "outside" / "x.jpg.mask").exists() and (ds / "images" / entries[0]["img_name"]).exists()


@pytest.mark.parametrize("target_exists", [False, True])
def test_a_link_planted_as_the_lock_is_not_followed(tiny_unet, tmp_path, polyp_image, target_exists):
    from PIL import Image

    from napari_vlsm.core.inference.folder_labeling import LOCK, OutputLock

    Image.fromarray(polyp_image).save(tmp_path / "a.png")
    out, outside = tmp_path / "out", tmp_path / "elsewhere" / "planted"
    out.mkdir()
    outside.parent.mkdir()
    if target_exists:
        outside.write_text("keep me")
    (out / LOCK).symlink_to(outside)
    res = cli("segment", tmp_path / "a.png", "-p", "polyp", "-o", out, "-m", tiny_unet)
    assert res.exit_code == 0, res.output
    assert (outside.read_text() == "keep me") if target_exists else not outside.exists()
    assert not (out / LOCK).exists() and (out / "a.png").exists()
    (out / LOCK).symlink_to(outside)
    with OutputLock(out):  # the library's lock too
        assert not (out / LOCK).is_symlink()
    assert (outside.read_text() == "keep me") if target_exists else not outside.exists()
