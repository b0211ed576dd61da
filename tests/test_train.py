import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_vlsm.core.training import loss as loss_module
from napari_vlsm.core.training import train as T
from napari_vlsm.core.errors import TrainingError
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.data.training_sets import Example, benchmark_examples

from .conftest import mean_dice


def run(gen):
    return list(gen)


def test_finetune_learns_on_16_real_kvasir_pairs(tiny_unet, small_benchmark, tmp_path):
    examples = benchmark_examples(small_benchmark, "train")
    before = mean_dice(load_model(tiny_unet, device="cpu"), examples, "polyp")
    # the live weights: a moving average over these 50 steps would lag them
    settings = T.TrainSettings(mode="full", epochs=25, lr=1e-2, batch_size=8, augment=False,
                               prompt_types=("p1",), schedule="onecycle", seed=0, patience=100, weight_average=0)
    events = run(T.finetune(str(tiny_unet), [small_benchmark], tmp_path / "run", settings, device="cpu"))
    epochs = [e for e in events if e.kind == "epoch"]
    assert events[-1].kind == "done" and len(epochs) == 25
    assert np.mean([e.loss for e in epochs[-3:]]) < 0.7 * np.mean([e.loss for e in epochs[:3]])
    after = mean_dice(load_model(tmp_path / "run" / "last", device="cpu"), examples, "polyp")
    assert after > before + 0.2 and after > 0.5, (before, after)
    meta = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert meta["settings"]["mode"] == "full" and len(meta["history"]) >= 1 and meta["data"]


@pytest.mark.parametrize("mode, vision_changes", [("decoder", False), ("full", True), ("lora", True)])
def test_training_modes_really_train_what_they_say(tiny_clipseg, small_benchmark, tmp_path, mode, vision_changes):
    settings = T.TrainSettings(mode=mode, epochs=1, batch_size=8, lr=1e-2, seed=0)
    events = run(T.finetune(str(tiny_clipseg), [small_benchmark], tmp_path, settings, device="cpu"))
    assert events[-1].kind == "done"
    old, new = load_file(tiny_clipseg / "model.safetensors"), load_file(tmp_path / "last" / "model.safetensors")
    assert set(old) == set(new)  # LoRA is merged back: a plain CLIPSeg checkpoint
    key = "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert (not torch.equal(old[key], new[key])) == vision_changes
    dec = "decoder.film_mul.weight"
    assert not torch.equal(old[dec], new[dec])
    Predictor(load_model(tmp_path / "last")).set_image(np.zeros((32, 32), np.uint8))


def test_stop_keeps_last_good_checkpoint(tiny_unet, small_benchmark, tmp_path):
    stop = threading.Event()
    settings = T.TrainSettings(mode="decoder", epochs=5, batch_size=8)
    seen = []
    for ev in T.finetune(str(tiny_unet), [small_benchmark], tmp_path, settings, stop=stop):
        seen.append(ev)
        if ev.kind == "epoch":
            before = (tmp_path / "best" / "model.safetensors").read_bytes()
            stop.set()
    assert seen[-1].kind == "stopped" and "intact" in seen[-1].message
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == before
    load_model(tmp_path / "best")


def weights_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(a: dict, b: dict) -> list[str]:
    """The names of the tensors that differ between two sets of weights."""
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))


def test_closing_the_generator_midway_leaves_checkpoints_loadable(tiny_unet, small_benchmark, tmp_path):
    backend = T.load_for_training(str(tiny_unet), "cpu")
    train_set, val_set = T.training_data([small_benchmark])
    # without a moving average the checkpoints hold the live weights, which the test compares
    gen = T.train(backend, train_set, val_set, tmp_path / "run", T.TrainSettings(epochs=3, batch_size=4,
                                                                                weight_average=0))
    for ev in gen:
        if ev.kind == "epoch":
            break
    after_epoch_1 = weights_of(backend.module)
    assert next(gen).kind == "step"  # one step into epoch 2
    gen.close()  # what napari's worker.quit() does
    assert changed(weights_of(backend.module), after_epoch_1)  # that step changed the weights
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "last"]
    for name in ("best", "last"):
        assert json.loads((tmp_path / "run" / name / "training.json").read_text())["epochs_done"] == 1
        assert changed(weights_of(load_model(tmp_path / "run" / name, "cpu", "fp32").module), after_epoch_1) == []


def test_best_keeps_the_epoch_with_the_highest_validation_dice(tiny_unet, small_benchmark, tmp_path, monkeypatch):
    scores, validated = iter([0.2, 0.5, 0.3]), []

    def scripted(backend, *args, **kwargs):
        validated.append(weights_of(backend.module))
        dice = next(scores)
        return T.Validation(dice, {small_benchmark.name: dice}, None)

    monkeypatch.setattr(T, "validate", scripted)
    settings = T.TrainSettings(mode="full", epochs=3, lr=1e-2, batch_size=8, patience=100)
    events = run(T.finetune(str(tiny_unet), [small_benchmark], tmp_path / "run", settings, device="cpu"))
    assert [e.val_dice for e in events if e.kind == "epoch"] == [0.2, 0.5, 0.3]
    assert events[-1].kind == "done" and events[-1].best_dice == 0.5
    assert events[-1].checkpoint == str(tmp_path / "run" / "best")
    best, last = (json.loads((tmp_path / "run" / name / "training.json").read_text()) for name in ("best", "last"))
    assert best["epochs_done"] == 2 and best["best_val_dice"] == 0.5
    assert last["epochs_done"] == 3 and last["best_val_dice"] == 0.5
    best_weights = weights_of(load_model(tmp_path / "run" / "best", "cpu", "fp32").module)
    last_weights = weights_of(load_model(tmp_path / "run" / "last", "cpu", "fp32").module)
    assert changed(best_weights, validated[1]) == [] and changed(last_weights, validated[2]) == []
    assert changed(best_weights, last_weights)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_unet, small_benchmark, tmp_path, monkeypatch):
    real = loss_module.dice_bce_loss
    calls = {"n": 0}

    def flaky(logits, target, empty_tolerance=0.0):
        calls["n"] += 1
        loss = real(logits, target, empty_tolerance)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(loss_module, "dice_bce_loss", flaky)
    gen = T.finetune(str(tiny_unet), [small_benchmark], tmp_path, T.TrainSettings(epochs=5, batch_size=8))
    with pytest.raises(TrainingError, match="nan.*lower learning rate"):
        run(gen)
    assert (tmp_path / "best" / "config.json").exists()
    load_model(tmp_path / "best")


def test_failed_checkpoint_write_keeps_previous(tiny_unet, tmp_path):
    from napari_vlsm.core.training.checkpoint import save_checkpoint

    backend = load_model(tiny_unet)
    save_checkpoint(backend, tmp_path / "best", {"epoch": 1})
    before = (tmp_path / "best" / "model.safetensors").read_bytes()

    def broken(folder):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    backend.save = broken
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(backend, tmp_path / "best", {"epoch": 2})
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "best" / "training.json").read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_bad_training_input_gets_clear_messages(tiny_unet, small_benchmark, tmp_path, polyp_image):
    backend = load_model(tiny_unet)
    with pytest.raises(TrainingError, match="empty"):
        run(T.train(backend, [], [], tmp_path))
    bad = Example(polyp_image, np.zeros((10, 10), np.uint8), {"p1": "polyp"}, name="bad")
    with pytest.raises(TrainingError, match="mask shape"):
        run(T.train(backend, [bad], [], tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ok = Example(polyp_image, np.zeros(polyp_image.shape[:2], np.uint8), {"p1": "polyp"})
    with pytest.raises(OSError, match="Cannot write checkpoints"):
        run(T.train(backend, [ok], [], blocker / "out"))
    with pytest.raises(TrainingError, match="No data folder"):
        run(T.finetune(str(tiny_unet), [tmp_path / "missing"], tmp_path / "o"))


def test_single_example_with_several_label_values(tiny_unet, polyp_image, tmp_path):
    labels = np.zeros(polyp_image.shape[:2], np.uint8)
    labels[50:100, 50:100] = 1
    labels[150:200, 150:200] = 2
    ex = Example(polyp_image, labels, {"p1": "polyp"}, label=2)
    _, fg = ex.load()
    assert fg.sum() == 2500 and fg[160, 160] and not fg[60, 60]
    events = run(T.train(load_model(tiny_unet), [ex], [], tmp_path, T.TrainSettings(epochs=2, batch_size=4)))
    assert events[-1].kind == "done" and (tmp_path / "best" / "config.json").exists()


def test_resume_continues_from_last(tiny_unet, small_benchmark, tmp_path):
    s = T.TrainSettings(epochs=2, batch_size=8)
    run(T.finetune(str(tiny_unet), [small_benchmark], tmp_path, s))
    s.epochs = 3
    events = run(T.finetune(str(tiny_unet), [small_benchmark], tmp_path, s, resume=True))
    assert [e.epoch for e in events if e.kind == "epoch"] == [3]
    assert json.loads((tmp_path / "last" / "training.json").read_text())["epochs_done"] == 3


@pytest.mark.parametrize("sync", [True, False])
def test_distributed_two_processes_on_gloo(tiny_unet, small_benchmark, tmp_path, sync):
    """Ranks end with identical weights; with gradient averaging switched off they would not."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NAPARI_VLSM_NO_GRAD_SYNC": "0" if sync else "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_vlsm.cli", "finetune", str(small_benchmark), "--model", str(tiny_unet),
           "--out", str(out), "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--train", "full"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["best", "last"]
    meta = json.loads((out / "last" / "training.json").read_text())
    assert meta["epochs_done"] == 2 and meta["world_size"] == 2
    a, b = meta["rank_weight_sums"]
    assert (a == b) if sync else (abs(a - b) > 1e-3)  # float64 sums of |w|: any drift shows
    load_model(out / "best")


def test_weight_average_follows_its_formula_and_swaps_back():
    from napari_vlsm.core.training.weight_average import WeightAverage

    layer = torch.nn.BatchNorm1d(2)
    average = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(3.0)
        layer.running_mean.fill_(1.0)
    average.update(layer)  # step 1: decay min(0.5, 2/11) -> 2/11 of the old value stays
    keep = 2 / 11
    assert torch.allclose(average.state["weight"], torch.full((2,), keep * 1.0 + (1 - keep) * 3.0))
    assert torch.allclose(average.state["running_mean"], torch.full((2,), (1 - keep) * 1.0))
    with average.applied(layer):
        assert torch.equal(layer.weight.detach(), average.state["weight"])
    assert torch.equal(layer.weight.detach(), torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(layer, decay=1.0)


def test_weight_average_is_what_is_validated_and_saved(tiny_unet, small_benchmark, tmp_path):
    backend = T.load_for_training(str(tiny_unet), "cpu")
    train_set, val_set = T.training_data([small_benchmark])
    settings = T.TrainSettings(mode="full", epochs=3, lr=1e-2, batch_size=8, prompt_types=("p1",),
                               patience=100, weight_average=0.9)
    events = run(T.train(backend, train_set, val_set, tmp_path / "run", settings))
    assert events[-1].kind == "done"
    saved = load_file(tmp_path / "run" / "last" / "model.safetensors")
    live = backend.module.state_dict()
    assert any(not torch.equal(saved[k], live[k]) for k in saved if saved[k].is_floating_point())
    # the last epoch's validation Dice is the saved (averaged) model's
    reloaded = T.load_for_training(str(tmp_path / "run" / "last"), "cpu")
    cache = T.PairCache(val_set, reloaded.input_size)
    again = T.validate(reloaded, cache, val_set, "p1", 8)
    meta = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert again.dice == pytest.approx(meta["history"][-1]["val_dice"], abs=1e-4)
    assert meta["settings"]["weight_average"] == 0.9


def test_validation_answers_from_both_views_when_the_model_is_set_to(tiny_unet, small_benchmark):
    from napari_vlsm.core.images.metrics import dice

    backend = T.load_for_training(str(tiny_unet), "cpu")
    _, val_set = T.training_data([small_benchmark])
    cache = T.PairCache(val_set, backend.input_size)
    with torch.no_grad():  # centre the random model's logits, so that its masks are neither empty nor full
        pixels = backend.preprocess([cache[i][0] for i in range(len(val_set))])
        text = backend.encode_text([ex.prompts["p1"] for ex in val_set])
        backend.module.head.bias -= backend.decode(backend.encode_image(pixels), text).median()
    one_view = T.validate(backend, cache, val_set, "p1", 8)
    backend.flip_average = True
    two_views = T.validate(backend, cache, val_set, "p1", 8)
    predictor = Predictor(backend)  # reads the same flag: the answer a user would get
    expected = []
    for i, ex in enumerate(val_set):
        image, truth = cache[i]
        predictor.set_image(image)
        expected.append(dice(predictor.predict(ex.prompts["p1"]).masks[0], truth))
    assert two_views.dice == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert two_views.dice != pytest.approx(one_view.dice, abs=1e-6)


def test_early_stop_writes_last_with_the_epoch_it_stopped_at(tiny_unet, small_benchmark, tmp_path):
    settings = T.TrainSettings(mode="full", epochs=40, lr=1e-2, batch_size=8, prompt_types=("p1",),
                               patience=1, augment=False)
    events = run(T.finetune(str(tiny_unet), [small_benchmark], tmp_path / "run", settings, device="cpu"))
    epochs = [e for e in events if e.kind == "epoch"]
    assert events[-1].kind == "done" and len(epochs) < 40
    assert f"stopped early after epoch {len(epochs)}" in events[-1].message, events[-1].message
    meta = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert meta["epochs_done"] == len(epochs)
