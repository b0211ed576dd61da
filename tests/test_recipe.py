"""The training recipe: pooled data sets whose prompts choose, the few-shot defaults, the
replay sample, and resuming on an enlarged set. Real pairs, the tiny FiLM-UNet, real runs."""

import json
import random

import numpy as np
import pytest

from napari_vlsm.core.training import train as T
from napari_vlsm.core.training.validation import val_prompt
from napari_vlsm.core.data.prompts import TRAIN_PROMPT_TYPES
from napari_vlsm.core.data.concepts import NegativePrompts, add_synonyms, concept_of
from napari_vlsm.core.data.replay import REPLAY_DIR, replay_examples, write_replay_sample
from napari_vlsm.core.data.training_sets import benchmark_examples

from .conftest import small_copy


@pytest.fixture
def pooled(data_sets, tmp_path):
    """Small copies of a polyp set, the polyp-free frames and breast ultrasound."""
    return [small_copy(data_sets / name, tmp_path / "data" / name, n_train, n_val)
            for name, n_train, n_val in (("kvasir_seg", 6, 2), ("colonoscopy_negatives", 3, 2), ("busi", 6, 3))]


def test_concepts_and_cross_negatives(pooled):
    examples = [ex for d in pooled for ex in benchmark_examples(d, "train")]
    concepts = concept_of(examples)
    assert concepts == {"kvasir_seg": "polyp", "colonoscopy_negatives": "polyp",
                        "busi": "tumor in the breast ultrasound image."}
    neg = NegativePrompts(examples, TRAIN_PROMPT_TYPES, [])
    rng = random.Random(0)
    polyp_ex = next(ex for ex in examples if ex.group == "kvasir_seg")
    free_ex = next(ex for ex in examples if ex.group == "colonoscopy_negatives")
    busi_ex = next(ex for ex in examples if ex.group == "busi")
    for _ in range(50):
        assert "breast" in neg.draw(polyp_ex, rng).lower() and "breast" in neg.draw(free_ex, rng).lower()
        assert "polyp" in neg.draw(busi_ex, rng).lower()
    mixed = NegativePrompts(examples, TRAIN_PROMPT_TYPES, ["kidney"])
    drawn = {mixed.draw(polyp_ex, rng) for _ in range(200)}
    assert "kidney" in drawn and any("breast" in d.lower() for d in drawn)
    assert not NegativePrompts(examples[:3], TRAIN_PROMPT_TYPES, [])  # one concept: nothing to draw


def test_synonyms_are_drawn_for_their_data_set_only(pooled):
    examples = [ex for d in pooled for ex in benchmark_examples(d, "train")]
    add_synonyms(examples, {"busi": ["breast tumor"]})
    rng = random.Random(0)
    busi = [ex for ex in examples if ex.group == "busi"]
    assert any(ex.prompt(("syn",), rng) == "breast tumor" for ex in busi)
    assert all("syn" not in ex.prompts for ex in examples if ex.group != "busi")
    with pytest.raises(ValueError, match="not being trained: brain"):
        add_synonyms(examples, {"brain": ["glioma"]})


def test_repeat_oversamples_a_data_set_and_names_unknown_ones(pooled):
    examples = [ex for d in pooled for ex in benchmark_examples(d, "train")]
    more = T.oversample(examples, {"busi": 3})
    assert sum(ex.group == "busi" for ex in more) == 3 * sum(ex.group == "busi" for ex in examples)
    assert sum(ex.group == "kvasir_seg" for ex in more) == sum(ex.group == "kvasir_seg" for ex in examples)
    with pytest.raises(T.TrainingError, match="TrainSettings.repeat names brain"):
        T.oversample(examples, {"brain": 2})


def test_pooled_run_records_each_data_set_and_the_cross_prompt_rate(tiny_unet, pooled, tmp_path):
    s = T.TrainSettings(epochs=2, negative_fraction=0.5, synonyms={"busi": ["breast tumor"]}, repeat={"busi": 2})
    events = list(T.finetune(str(tiny_unet), pooled, tmp_path / "run", s, device="cpu"))
    meta = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    for h in meta["history"]:
        assert set(h["val_dice_by_set"]) == {"kvasir_seg", "colonoscopy_negatives", "busi"}
        assert h["val_dice"] == pytest.approx(np.mean(list(h["val_dice_by_set"].values())))
        assert 0.0 <= h["val_cross_prompt_rate"] <= 1.0
    assert events[-1].kind == "done" and "validated on 7" in events[-1].message
    assert "Trained on 15 image(s) (21 with repeats)" in events[-1].message


def test_few_shot_defaults_train_every_correction_for_a_fixed_number_of_steps(tiny_unet, data_sets, tmp_path,
                                                                             monkeypatch):
    from napari_vlsm.core.training import settings as S

    monkeypatch.setattr(S, "ROUND_STEPS", 24)  # the rule, at a test's scale
    few = small_copy(data_sets / "busi", tmp_path / "few", 8, 0)
    (few / "anns" / "val.json").unlink()
    events = list(T.finetune(str(tiny_unet), [few], tmp_path / "run", device="cpu"))
    done = events[-1]
    assert done.kind == "done" and "Trained on 8 image(s), validated on 0 (every example trains)" in done.message
    assert done.step == 24 and done.epochs == 24  # one batch of 8 per epoch
    meta = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert meta["settings"]["mode"] == "full" and meta["settings"]["lr"] == 1e-3  # the FiLM-UNet's own
    assert meta["settings"]["steps"] == 24 and meta["settings"]["weight_average"] == S.ROUND_AVERAGE
    assert meta["settings"]["frozen_levels"] == 0  # the from-scratch UNet encoder trains whole
    train_set, val_set = T.training_data([few])
    assert len(train_set) == 8 and val_set == []


def test_a_validation_dice_of_zero_everywhere_never_picks_the_checkpoint(tiny_unet, small_benchmark, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(T, "validate", lambda *a, **k: T.Validation(0.0, {"kvasir_small": 0.0}, None))
    s = T.TrainSettings(epochs=8, patience=2)
    events = list(T.finetune(str(tiny_unet), [small_benchmark], tmp_path / "run", s, device="cpu"))
    assert len([e for e in events if e.kind == "epoch"]) == 8  # no early stop on an uninformative score
    from safetensors.torch import load_file

    best = load_file(tmp_path / "run" / "best" / "model.safetensors")
    last = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert all(np.array_equal(best[k].numpy(), last[k].numpy()) for k in best)  # the schedule's end


def record_batch_groups(monkeypatch) -> list:
    """The data set ("group") of each example in every training batch, as training draws them."""
    batches = []
    real = T._make_batch

    def spy(cache, examples, idx, *args):
        batches.append([examples[i].group for i in idx])
        return real(cache, examples, idx, *args)

    monkeypatch.setattr(T, "_make_batch", spy)
    return batches


def test_replay_sample_is_mixed_into_every_batch_and_travels_with_checkpoints(tiny_unet, pooled, tmp_path,
                                                                             monkeypatch):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_unet, base)
    write_replay_sample([pooled[0], pooled[2]], base, per_set=4)
    assert len(replay_examples(base / REPLAY_DIR)) == 8
    batches = record_batch_groups(monkeypatch)
    asked_absent = []
    real_draw = NegativePrompts.draw
    monkeypatch.setattr(NegativePrompts, "draw", lambda self, ex, rng: asked_absent.append(ex.group)
                        or real_draw(self, ex, rng))
    new = small_copy(pooled[1].parent / "colonoscopy_negatives", tmp_path / "new", 3, 0)
    events = list(T.finetune(str(base), [new], tmp_path / "run", T.TrainSettings(epochs=3), device="cpu"))
    assert "mixed with 8 replay pair(s)" in events[-1].message
    assert all(b.count("new") == 3 and len(b) == 7 for b in batches)  # 3 corrections + 4 replay pairs
    assert all({"kvasir_seg", "busi"} & set(b) for b in batches)
    # prompts for absent things are asked on replay images too, not only on the corrections
    assert {"kvasir_seg", "busi"} & set(asked_absent) and "new" in asked_absent
    assert len(replay_examples(tmp_path / "run" / "best" / REPLAY_DIR)) == 8
    # the next round, from the finetuned model, keeps mixing the same sample in
    events = list(T.finetune(str(tmp_path / "run" / "best"), [new], tmp_path / "run2", T.TrainSettings(epochs=1)))
    assert "mixed with 8 replay pair(s)" in events[-1].message


def test_the_replay_share_given_on_the_command_line_is_the_share_of_each_batch(tiny_unet, data_sets, tmp_path,
                                                                            monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from napari_vlsm.cli import app

    base = tmp_path / "base"
    shutil.copytree(tiny_unet, base)
    write_replay_sample([small_copy(data_sets / "kvasir_seg", tmp_path / "data" / "kvasir_seg", 4, 0)], base,
                        per_set=4)
    mine = small_copy(data_sets / "kvasir_seg", tmp_path / "mine", 12, 0)  # polyps: the base's class, no adapter
    (mine / "anns" / "val.json").unlink()
    batches = record_batch_groups(monkeypatch)
    res = CliRunner().invoke(app, ["finetune", str(mine), "--model", str(base), "--out", str(tmp_path / "run"),
                                   "--epochs", "2", "--batch-size", "8", "--replay-fraction", "0.25",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(batches) == 4 and all(len(b) == 8 and b.count("kvasir_seg") == 2 for b in batches), batches
    meta = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert meta["settings"]["replay_fraction"] == 0.25 and meta["adapter"] is None


def test_resume_after_adding_examples_trains_a_new_round_on_the_same_validation_set(tiny_unet, data_sets, tmp_path):
    src = data_sets / "busi"
    folder = small_copy(src, tmp_path / "mine", 10, 0)
    (folder / "anns" / "val.json").unlink()
    s = T.TrainSettings(epochs=2, val_fraction=0.3)
    list(T.finetune(str(tiny_unet), [folder], tmp_path / "run", s, device="cpu"))
    first = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert len(first["val_names"]) == 3

    entries = json.loads((src / "anns" / "train.json").read_text())[10:16]  # six more corrections
    rows = json.loads((folder / "anns" / "train.json").read_text()) + entries
    (folder / "anns" / "train.json").write_text(json.dumps(rows))
    for e in entries:
        for sub, key in (("images", "img_name"), ("masks", "mask_name")):
            (folder / sub / e[key]).write_bytes((src / sub / e[key]).read_bytes())
    events = list(T.finetune(str(tiny_unet), [folder], tmp_path / "run", s, resume=True, device="cpu"))
    second = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert entries  # the fixture has 12 BUSI training pairs, the full set 624
    assert sorted(second["val_names"]) == sorted(first["val_names"]) and second["train_examples"] == 7 + len(entries)
    assert second["round"] == 2 and len([e for e in events if e.kind == "epoch"]) == 2
    assert [h["round"] for h in second["history"]] == [1, 1, 2, 2]
    # unchanged set and schedule complete: nothing more to train, and it says so
    events = list(T.finetune(str(tiny_unet), [folder], tmp_path / "run", s, resume=True, device="cpu"))
    assert "already complete" in events[-1].message and (tmp_path / "run" / "best" / "config.json").exists()
    # one correction replaced by another: as many examples, yet a new round
    rows = json.loads((folder / "anns" / "train.json").read_text())
    row = next(r for r in rows if f"mine/{r['img_name']}" not in second["val_names"])
    (folder / "images" / f"again_{row['img_name']}").write_bytes((folder / "images" / row["img_name"]).read_bytes())
    rows[rows.index(row)] = {**row, "img_name": f"again_{row['img_name']}"}
    (folder / "anns" / "train.json").write_text(json.dumps(rows))
    list(T.finetune(str(tiny_unet), [folder], tmp_path / "run", s, resume=True, device="cpu"))
    assert json.loads((tmp_path / "run" / "last" / "training.json").read_text())["round"] == 3


def test_images_without_the_object_are_asked_for_their_own_class(pooled):
    import torch

    examples = [ex for d in pooled for ex in benchmark_examples(d, "train")]
    negatives = NegativePrompts(examples, TRAIN_PROMPT_TYPES, [])
    tumour = next(ex for ex in examples if ex.group == "busi" and ex.load()[1].any())
    polyp = next(ex for ex in examples if ex.group == "kvasir_seg")
    rng, asked = random.Random(0), []
    for _ in range(200):
        target = torch.zeros(2, 8, 8)
        target[1, 2:4, 2:4] = 1  # the polyp is in view; the tumour image's crop shows no tumour
        prompts = ["No tumor in the breast ultrasound image.", "polyp"]
        T._ask_own_class_where_absent(target, prompts, [tumour, polyp], negatives, rng)
        assert prompts[1] == "polyp"
        asked.append(prompts[0])
    replaced = [p for p in asked if not p.startswith("No tumor")]
    assert 60 < len(replaced) < 140  # about half
    assert all("tumor" in p.lower() and not p.lower().startswith("no ") for p in replaced)
    # validation asks the same way: the class where the object is absent, the own prompt elsewhere
    concepts = concept_of(examples)
    assert val_prompt(tumour, False, "p1", concepts, rng) == "tumor in the breast ultrasound image."
    assert val_prompt(tumour, True, "p1", concepts, rng) == tumour.prompts["p1"]


def test_a_finetune_asks_images_without_the_object_for_their_own_class(data_sets, tiny_unet, tmp_path, monkeypatch):
    rows = json.loads((data_sets / "busi" / "anns" / "train.json").read_text())
    normal = [r for r in rows if r["prompts"]["p1"].startswith("No tumor")][:2]
    tumour = [r for r in rows if r["prompts"]["p1"].startswith("Tumor")][:4]
    folder = tmp_path / "busi"
    for sub, key in (("images", "img_name"), ("masks", "mask_name")):
        (folder / sub).mkdir(parents=True)
        for r in normal + tumour:
            (folder / sub / r[key]).write_bytes((data_sets / "busi" / sub / r[key]).read_bytes())
    (folder / "anns").mkdir()
    (folder / "anns" / "train.json").write_text(json.dumps(normal + tumour))
    asked = []  # (the image's own p1, the prompt asked, whether its target has the object)
    real = T.batch_loss

    def spy(backend, pixels, target, prompts, settings, rng, negatives, batch):
        asked.extend((ex.prompts["p1"], p, bool(t.any())) for ex, p, t in zip(batch, prompts, target))
        return real(backend, pixels, target, prompts, settings, rng, negatives, batch)

    monkeypatch.setattr(T, "batch_loss", spy)
    s = T.TrainSettings(epochs=4, batch_size=6, crop=0)  # whole images: only the normal ones are empty
    assert list(T.finetune(str(tiny_unet), [folder], tmp_path / "run", s, device="cpu"))[-1].kind == "done"
    on_normal = [(p, has) for own, p, has in asked if own.startswith("No tumor")]
    assert len(on_normal) == 8 and not any(has for _, has in on_normal)
    for_tumour = [p for p, _ in on_normal if "tumor" in p.lower() and not p.startswith("No ")]
    assert 0 < len(for_tumour) < 8  # about half are asked for the tumour, with an empty target
    assert all(p.startswith("No tumor") for p in {p for p, _ in on_normal} - set(for_tumour))
