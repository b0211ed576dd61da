"""Rounds of corrections: what a round trains (frozen encoder levels, the corrections new to
the model weighed up), how long it is, where its time goes, and the checkpoints it leaves.
Real pairs, tiny models, real runs."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.data.replay import write_replay_sample
from napari_vlsm.core.errors import TrainingError
from napari_vlsm.core.training import train as T
from napari_vlsm.core.training.checkpoint import save_checkpoint

from .conftest import small_copy


def as_base(model, data_sets, tmp_path):
    """A copy of a tiny model that knows polyps: a replay sample and a card, so a new class
    gets an adapter."""
    folder = tmp_path / "base"
    shutil.copytree(model, folder)
    write_replay_sample([small_copy(data_sets / "kvasir_seg", tmp_path / "data" / "kvasir_seg", 4, 0)], folder,
                        per_set=4)
    (folder / "vlsm_card.json").write_text(json.dumps({"suggestions": ["polyp"]}))
    return folder


def corrections(data_sets, folder, first, last):
    """BUSI pairs ``first`` to ``last`` of its training split, asked for "breast tumor", in a
    corrections folder (added to what it holds, as an annotator adds them)."""
    src = data_sets / "busi"
    rows = json.loads((src / "anns" / "train.json").read_text())[first:last]
    ann = folder / "anns" / "train.json"
    held = json.loads(ann.read_text()) if ann.exists() else []
    for row in rows:
        row["prompts"] = {"p1": "breast tumor"}
        for sub, key in (("images", "img_name"), ("masks", "mask_name")):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / sub / row[key], folder / sub / row[key])
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(held + rows))
    return folder


def test_frozen_levels_of_an_adapter_keep_the_bases_weights_and_the_rest_learns(
        tiny_efficientnet_unet, data_sets, tmp_path):
    base = as_base(tiny_efficientnet_unet, data_sets, tmp_path)
    data = corrections(data_sets, tmp_path / "corr", 0, 6)
    s = T.TrainSettings(epochs=2, frozen_levels=2, lr=1e-2)
    events = list(T.finetune(str(base), [data], tmp_path / "run", s, device="cpu"))
    assert "adapter 1" in events[-1].message
    start, after = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "best" / "model.safetensors")
    stem_and_two = ("encoder._conv_stem.", "encoder._bn0.", "encoder._blocks.0.", "encoder._blocks.1.",
                    "encoder._blocks.2.")
    frozen = [k for k in start if k.startswith(stem_and_two)]
    assert frozen and all(torch.equal(after["adapters.0." + k], start[k]) for k in frozen)  # running stats too
    later = [k for k in start if k.startswith("encoder._blocks.3.") and k.endswith("weight")]
    assert later and all(not torch.equal(after["adapters.0." + k], start[k]) for k in later)
    assert not torch.equal(after["adapters.0.head.weight"], start["head.weight"])


def test_frozen_levels_of_the_unet_encoder_in_the_shared_network(tiny_unet, small_benchmark, tmp_path):
    s = T.TrainSettings(epochs=1, frozen_levels=1, lr=1e-2)
    list(T.finetune(str(tiny_unet), [small_benchmark], tmp_path / "run", s, device="cpu"))
    start, after = load_file(tiny_unet / "model.safetensors"), load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.equal(after[k], start[k]) for k in start if k.startswith("encoder.0."))
    assert not torch.equal(after["encoder.1.0.weight"], start["encoder.1.0.weight"])


def test_frozen_levels_are_refused_for_a_family_without_them(tiny_clipseg, small_benchmark, tmp_path):
    with pytest.raises(TrainingError, match="Frozen encoder levels are for the FiLM-UNet"):
        list(T.finetune(str(tiny_clipseg), [small_benchmark], tmp_path / "run", T.TrainSettings(frozen_levels=1),
                        device="cpu"))


def test_a_continued_round_draws_every_correction_alike_or_the_new_ones_at_the_share_asked(
        tiny_unet, data_sets, tmp_path, monkeypatch):
    base = as_base(tiny_unet, data_sets, tmp_path)
    data = corrections(data_sets, tmp_path / "corr", 0, 6)
    list(T.finetune(str(base), [data], tmp_path / "r1", T.TrainSettings(epochs=1), device="cpu"))
    first = json.loads((tmp_path / "r1" / "best" / "training.json").read_text())
    assert first["adapter"] == 1 and len(first["trained_names"]) == 6
    corrections(data_sets, data, 6, 8)  # two more corrections
    new = {row["img_name"] for row in json.loads((data / "anns" / "train.json").read_text())[6:]}
    assert len(new) == 2
    drawn = []
    real = T._make_batch

    def spy(cache, examples, idx, *args):
        drawn.extend(examples[i].name for i in idx if examples[i].group == "corr")
        return real(cache, examples, idx, *args)

    monkeypatch.setattr(T, "_make_batch", spy)
    s = T.TrainSettings(epochs=4, new_share=0.5)
    events = list(T.finetune(str(tmp_path / "r1" / "best"), [data], tmp_path / "r2", s, device="cpu"))
    message = events[-1].message
    assert "Trained on 8 image(s) as adapter 1" in message  # the same adapter goes on
    assert "going on from a model trained on 6 of them (the 2 new drawn about 50% of the time)" in message
    assert sum(name in new for name in drawn) == len(drawn) // 2  # 2 new x 3 against 6 old, every epoch
    second = json.loads((tmp_path / "r2" / "best" / "training.json").read_text())
    assert len(second["trained_names"]) == 8
    # by default (no share), or from a model that did not train this path, every correction counts once
    for k, (start, settings) in enumerate(((tmp_path / "r1" / "best", T.TrainSettings(epochs=4)),
                                           (base, T.TrainSettings(epochs=4, new_share=0.5)))):
        drawn.clear()
        events = list(T.finetune(str(start), [data], tmp_path / f"again{k}", settings, device="cpu"))
        assert sum(name in new for name in drawn) == len(drawn) // 4
    assert "going on" not in events[-1].message


def test_a_round_says_where_its_time_went(tiny_unet, small_benchmark, tmp_path):
    res = CliRunner().invoke(app, ["finetune", str(small_benchmark), "--model", str(tiny_unet), "--out",
                                   str(tmp_path / "run"), "--steps", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("Time: "))
    for phase in ("loading the model", "reading images", "making batches", "optimiser steps", "validation",
                  "checkpoints"):
        assert phase in line
    assert "finished the schedule (4 steps, " in " ".join(res.output.split())


def test_best_is_written_as_a_copy_of_last_that_shares_its_weights(tiny_unet, data_sets, tmp_path):
    data = corrections(data_sets, tmp_path / "corr", 0, 4)  # no validation: the schedule's end is kept
    list(T.finetune(str(tiny_unet), [data], tmp_path / "run", T.TrainSettings(epochs=2), device="cpu"))
    best, last = tmp_path / "run" / "best", tmp_path / "run" / "last"
    assert sorted(p.name for p in best.iterdir()) == sorted(p.name for p in last.iterdir())
    assert os.stat(best / "model.safetensors").st_ino == os.stat(last / "model.safetensors").st_ino
    assert os.stat(best / "training.json").st_ino != os.stat(last / "training.json").st_ino  # small files: copies
    assert json.loads((best / "training.json").read_text()) == json.loads((last / "training.json").read_text())
    # a later save of last/ writes new files: best/ keeps its own
    before = (best / "model.safetensors").read_bytes()
    backend = T.load_for_training(str(last), "cpu")
    with torch.no_grad():
        backend.module.head.weight.add_(1.0)
    save_checkpoint(backend, last, {"epochs_done": 3})
    assert (last / "model.safetensors").read_bytes() != before
    assert (best / "model.safetensors").read_bytes() == before


def test_a_round_of_corrections_is_short_and_a_larger_set_is_drawn_often_enough():
    from napari_vlsm.core.training.settings import ROUND_PASSES, ROUND_SIZE, ROUND_STEPS

    s = T.TrainSettings()
    assert [s.round_steps(n, 7) for n in (1, 20, 80)] == [ROUND_STEPS] * 3  # a round of corrections: one length
    assert s.round_steps(624, 7) == -(-ROUND_PASSES * 624 // 7)  # a whole data set: each drawn ROUND_PASSES times
    assert s.round_steps(624, 7) > s.round_steps(300, 7) > ROUND_STEPS
    assert T.TrainSettings(steps=12).round_steps(624, 7) == 12
    # the quoted round size is where the rule starts giving more steps, for an adapter's batches of 7 corrections
    assert ROUND_SIZE == 87 and s.round_steps(ROUND_SIZE, 7) == ROUND_STEPS < s.round_steps(ROUND_SIZE + 1, 7)


def test_the_pretrained_encoder_keeps_its_first_three_levels_by_default(tiny_efficientnet_unet, data_sets, tmp_path):
    base = as_base(tiny_efficientnet_unet, data_sets, tmp_path)
    data = corrections(data_sets, tmp_path / "corr", 0, 4)
    list(T.finetune(str(base), [data], tmp_path / "run", T.TrainSettings(epochs=1, lr=1e-2), device="cpu"))
    meta = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert meta["settings"]["frozen_levels"] == 3
    start, after = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "best" / "model.safetensors")
    level3 = [k for k in start if k.startswith(("encoder._blocks.3.", "encoder._blocks.4."))]
    level4 = [k for k in start if k.startswith("encoder._blocks.5.") and k.endswith("weight")]
    assert all(torch.equal(after["adapters.0." + k], start[k]) for k in level3)
    assert all(not torch.equal(after["adapters.0." + k], start[k]) for k in level4)


def test_a_new_adapters_first_round_learns_faster_than_the_rounds_that_continue_it(tiny_efficientnet_unet,
                                                                                    data_sets, tmp_path):
    base = as_base(tiny_efficientnet_unet, data_sets, tmp_path)
    data = corrections(data_sets, tmp_path / "corr", 0, 4)
    rates = []
    for k, start in enumerate((base, tmp_path / "r1" / "best")):
        events = list(T.finetune(str(start), [data], tmp_path / f"r{k + 1}", T.TrainSettings(epochs=1), device="cpu"))
        meta = json.loads((tmp_path / f"r{k + 1}" / "best" / "training.json").read_text())
        assert meta["adapter"] == 1, events[-1].message
        rates.append(meta["settings"]["lr"])
        corrections(data_sets, data, 4, 6)  # two more for the next round
    assert rates == [2e-3, 1e-3]
    # a rate given is the rate used, in either round
    list(T.finetune(str(base), [data], tmp_path / "given", T.TrainSettings(epochs=1, lr=5e-4), device="cpu"))
    assert json.loads((tmp_path / "given" / "best" / "training.json").read_text())["settings"]["lr"] == 5e-4
