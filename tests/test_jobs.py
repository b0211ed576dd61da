"""The jobs behind ``segment`` and ``rank`` as library generators: progress as they go, the
files written, and a run closed midway leaving a report to resume from."""

import csv

import pytest

from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.inference.ranking import rank_images
from napari_vlsm.core.inference.segment_job import segment_folder
from napari_vlsm.core.models.loading import load_model


@pytest.fixture
def predictor(tiny_unet):
    return Predictor(load_model(tiny_unet, "cpu", "fp32"))


def report(out):
    return list(csv.DictReader(open(out / "segment_report.csv", newline="")))


def test_segment_folder_yields_each_image_and_reports_a_run_closed_midway(images, predictor, tiny_unet, tmp_path):
    paths = sorted(images.iterdir())
    out = tmp_path / "masks"
    run = segment_folder(paths, ["polyp"], out, str(tiny_unet), predictor=predictor)
    first = next(run)
    assert first.status == "ok" and first.out.exists()
    run.close()  # stopped after one image: the report says so, and the folder is free again
    assert [r["status"] for r in report(out)] == ["ok"]
    done = list(segment_folder(paths, ["polyp"], out, str(tiny_unet), resume=True, predictor=predictor))
    assert sorted(o.status for o in done) == ["ok", "ok", "skipped"]
    assert sorted(r["status"] for r in report(out)) == ["ok", "ok", "skipped"]
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]
    with pytest.raises(ValueError, match="out_dir"):  # the library's own argument names, not the options
        list(segment_folder(paths, ["instrument"], out, str(tiny_unet), predictor=predictor))


def test_rank_images_yields_each_image_then_the_ranking(images, tiny_unet, tmp_path):
    paths = sorted(images.iterdir()) + [tmp_path / "missing.png"]
    events = list(rank_images(load_model(tiny_unet, "cpu", "fp32"), paths, "polyp", order="uncertain",
                              done=["b.png"]))
    assert [e.kind for e in events] == ["image"] * 4 + ["done"]
    assert [e.seen for e in events[:4]] == [1, 2, 3, 4] and events[3].error and not events[0].error
    rows = events[-1].rows
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[-1]["image"].endswith("b.png") and rows[-1]["done"]
    assert [r["chosen"] for r in rows] == ["uncertainty", "uncertainty", "done"]
    with pytest.raises(ValueError, match="The order is kinds or uncertain"):
        next(rank_images(None, paths, "polyp", order="name"))
