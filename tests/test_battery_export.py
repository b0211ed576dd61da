"""Fault battery (issue 39), export: export-onnx never mixes an export into a model folder,
and an interrupted export leaves the earlier one whole."""

import shutil

import pytest
import torch

from napari_vlsm.core.models import onnx_export
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.models.onnx_backend import OnnxBackend
from tests.conftest import cli



def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("source", ["default", "same"])
def test_export_into_a_model_folder_is_refused_and_the_model_kept(tiny_unet, tmp_path, source):
    model = tmp_path / "model"
    shutil.copytree(tiny_unet, model)
    before = _contents(model)
    res = cli("export-onnx", "default" if source == "default" else model, model)  # export-onnx M M too
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "is a model folder" in text and "not an earlier ONNX export" in text and "new or empty" in text
    assert _contents(model) == before
    assert not isinstance(load_model(model, "cpu"), OnnxBackend)


def test_export_into_a_folder_of_other_files_is_refused(tiny_unet, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    res = cli("export-onnx", tiny_unet, tmp_path / "notes")
    assert res.exit_code == 2 and "is not empty (todo.txt)" in " ".join(res.output.split())
    with pytest.raises(ValueError, match="out_dir .* is not empty"):
        onnx_export.export(load_model(tiny_unet, "cpu", "fp32"), tmp_path / "notes")


def test_an_export_replaces_an_earlier_export_whole_or_not_at_all(tiny_unet, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    assert cli("export-onnx", tiny_unet, out).exit_code == 0  # into a new folder
    (out / "stale.txt").write_text("from the earlier export")
    assert cli("export-onnx", tiny_unet, out).exit_code == 0  # over an earlier export: replaced whole
    assert not (out / "stale.txt").exists() and onnx_export.is_export(out)
    before = _contents(out)

    real, calls = torch.onnx.export, []

    def killed_during_the_decoder(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:  # the encoder is written, the decoder not
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", killed_during_the_decoder)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export(load_model(tiny_unet, "cpu", "fp32"), out)
    assert len(calls) == 2 and _contents(out) == before  # the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporary folder left
    assert isinstance(load_model(out, "cpu"), OnnxBackend)


def test_a_swap_cut_between_its_renames_is_repaired_by_the_next_export(tiny_unet, tmp_path):
    out = tmp_path / "onnx"
    assert cli("export-onnx", tiny_unet, out).exit_code == 0
    (out).rename(tmp_path / ".onnx-old-4242")  # killed after the old one was moved aside
    (tmp_path / ".onnx-tmp-abc").mkdir()
    assert onnx_export.target_problem(out) is None
    assert onnx_export.is_export(out) and sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
