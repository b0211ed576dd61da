"""Concept adapters: a class new to a trained FiLM-UNet is learned on its own path, the base's
answers to its own prompts stay exactly as they were, and the model saves, reloads, goes on
learning in the next round and exports to ONNX with both paths. Real pairs, the tiny FiLM-UNet."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.training import train as T
from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.data.replay import write_replay_sample
from napari_vlsm.core.data.training_sets import benchmark_examples

from .conftest import mean_dice, small_copy

BASE_PROMPTS = ["polyp", "one small pink round polyp"]
NEW_PROMPTS = ["Tumor in the breast ultrasound image.", "breast tumor"]


@pytest.fixture
def base(tiny_unet, data_sets, tmp_path):
    """The tiny model as a trained base: a replay sample of polyp pairs and a card."""
    folder = tmp_path / "base"
    shutil.copytree(tiny_unet, folder)
    kvasir = small_copy(data_sets / "kvasir_seg", tmp_path / "data" / "kvasir_seg", 4, 0)
    write_replay_sample([kvasir], folder, per_set=4)
    (folder / "vlsm_card.json").write_text(json.dumps({"suggestions": ["polyp"], "negatives": ["kidney"]}))
    return folder


@pytest.fixture
def ultrasound(data_sets, tmp_path):
    """Six breast-ultrasound corrections, a class the base never saw, with its short form."""
    folder = small_copy(data_sets / "busi", tmp_path / "data" / "busi", 6, 0)
    (folder / "anns" / "val.json").unlink()
    rows = json.loads((folder / "anns" / "train.json").read_text())
    for row in rows:
        row["prompts"]["p1"] = "breast tumor" if row["prompts"].get("p1", "").startswith("Tumor") else \
            row["prompts"].get("p1", "")
    (folder / "anns" / "train.json").write_text(json.dumps(rows))
    return folder


def logits(model, image, prompts):
    backend = model if not isinstance(model, str) else load_model(model, "cpu", "fp32")
    with torch.no_grad():
        return backend.forward(backend.preprocess([image] * len(prompts)), prompts)


def test_a_new_class_gets_an_adapter_and_the_base_answers_as_before(base, ultrasound, polyp_image, tmp_path):
    events = list(T.finetune(str(base), [ultrasound], tmp_path / "run", T.TrainSettings(epochs=3), device="cpu"))
    assert "as adapter 1 of a new class (the base model is unchanged)" in events[-1].message
    assert "with 4 replay image(s) as negatives" in events[-1].message

    model = load_model(str(tmp_path / "run" / "best"), "cpu", "fp32")  # from_pretrained, strict
    cfg = model.module.config
    assert cfg.adapters == 1 and len(model.module.adapters) == 1
    owner = dict(zip(cfg.route_prompts, cfg.route_owners))
    assert owner["polyp"] == 0 and owner["kidney"] == 0 and owner["breast tumor"] == 1
    assert model.module.route(model.encode_text(BASE_PROMPTS + NEW_PROMPTS)).tolist() == [0, 0, 1, 1]
    # the base's own prompts and negatives: bit for bit what the base says (same thread count)
    before = logits(str(base), polyp_image, BASE_PROMPTS + ["kidney"])
    assert torch.equal(logits(model, polyp_image, BASE_PROMPTS + ["kidney"]), before)
    # the new prompt is answered by the trained adapter, not by the base
    image = read_image(next((ultrasound / "images").iterdir()))
    assert not torch.allclose(logits(model, image, ["breast tumor"]), logits(str(base), image, ["breast tumor"]))
    meta = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert meta["adapter"] == 1


def test_the_adapter_learns_its_class(base, ultrasound, tmp_path):
    """A class the tiny model can learn in a test's time: a bright square on ultrasound images."""
    from napari_vlsm.core.data.replay import REPLAY_DIR
    from napari_vlsm.core.data.training_sets import Example

    rng = np.random.default_rng(0)
    examples = []
    for i, ex in enumerate(benchmark_examples(ultrasound, "train")):
        image = ex.load()[0].copy()
        y, x = rng.integers(0, min(image.shape[:2]) // 2, 2)
        side = min(image.shape[:2]) // 3
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[y:y + side, x:x + side] = 1
        image[mask > 0] = 255
        examples.append(Example(image, mask, {"p1": "bright square"}, name=f"sq{i}", group="squares"))

    backend = load_model(str(base), "cpu", "fp32")
    start = mean_dice(backend, examples, "bright square")
    events = list(T.train(backend, examples, [], tmp_path / "run", T.TrainSettings(epochs=40, crop=0, lr=1e-2),
                          replay=base / REPLAY_DIR, card={"suggestions": ["polyp"]}))
    assert "as adapter 1" in events[-1].message
    trained = load_model(str(tmp_path / "run" / "best"), "cpu", "fp32")
    assert mean_dice(trained, examples, "bright square") > max(start + 0.3, 0.6)


def test_the_next_round_trains_the_same_adapter(base, ultrasound, polyp_image, tmp_path):
    list(T.finetune(str(base), [ultrasound], tmp_path / "r1", T.TrainSettings(epochs=1), device="cpu"))
    first = load_model(str(tmp_path / "r1" / "best"), "cpu", "fp32")
    events = list(T.finetune(str(tmp_path / "r1" / "best"), [ultrasound], tmp_path / "r2",
                             T.TrainSettings(epochs=1), device="cpu"))
    assert "as adapter 1 of a new class" in events[-1].message
    second = load_model(str(tmp_path / "r2" / "best"), "cpu", "fp32")
    assert second.module.config.adapters == 1
    a, b = first.module.state_dict(), second.module.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("adapters.0."))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("adapters."))
    assert torch.equal(logits(second, polyp_image, ["polyp"]), logits(str(base), polyp_image, ["polyp"]))


def test_a_known_class_or_adapters_off_trains_the_shared_network(base, data_sets, tmp_path):
    polyps = small_copy(data_sets / "kvasir_seg", tmp_path / "mine", 3, 0)
    (polyps / "anns" / "val.json").unlink()
    events = list(T.finetune(str(base), [polyps], tmp_path / "run", T.TrainSettings(epochs=1), device="cpu"))
    assert "adapter" not in events[-1].message and "mixed with 4 replay pair(s)" in events[-1].message
    assert load_model(str(tmp_path / "run" / "best"), "cpu", "fp32").module.config.adapters == 0


def test_a_mix_of_known_and_new_classes_trains_the_shared_network(base, ultrasound, data_sets, tmp_path):
    polyps = small_copy(data_sets / "kvasir_seg", tmp_path / "mine", 3, 0)
    (polyps / "anns" / "val.json").unlink()
    events = list(T.finetune(str(base), [polyps, ultrasound], tmp_path / "run", T.TrainSettings(epochs=1),
                             device="cpu"))
    assert "adapter" not in events[-1].message and "mixed with 4 replay pair(s)" in events[-1].message
    trained = load_model(str(tmp_path / "run" / "best"), "cpu", "fp32").module
    assert trained.config.adapters == 0 and len(trained.adapters) == 0 and not trained.config.route_prompts
    assert json.loads((tmp_path / "run" / "best" / "training.json").read_text())["adapter"] is None
    before, after = load_model(str(base), "cpu", "fp32").module.state_dict(), trained.state_dict()
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)


def test_adapters_off_from_the_command_line(base, ultrasound, tmp_path):
    res = CliRunner().invoke(app, ["finetune", str(ultrasound), "--model", str(base), "--out", str(tmp_path / "run"),
                                   "--epochs", "1", "--adapters", "off", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "mixed with 4 replay pair(s)" in res.output
    assert load_model(str(tmp_path / "run" / "best"), "cpu", "fp32").module.config.adapters == 0
    res = CliRunner().invoke(app, ["finetune", str(ultrasound), "--model", str(base), "--out", str(tmp_path / "x"),
                                   "--adapters", "maybe"])
    assert res.exit_code != 0 and "--adapters is auto or off" in res.output


def test_onnx_export_keeps_both_paths(base, ultrasound, polyp_image, tmp_path):
    list(T.finetune(str(base), [ultrasound], tmp_path / "run", T.TrainSettings(epochs=1), device="cpu"))
    src, out = tmp_path / "run" / "best", tmp_path / "onnx"
    res = CliRunner().invoke(app, ["export-onnx", str(src), str(out)])
    assert res.exit_code == 0, res.output
    ours, ref = Predictor(load_model(out)), Predictor(load_model(str(src), "cpu", "fp32"))
    prompts = ["polyp", "breast tumor"]
    for p in (ours, ref):
        p.set_image(polyp_image)
    got, want = ours.predict(prompts).probs, ref.predict(prompts).probs
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert not np.allclose(want[0], want[1], atol=1e-3)  # two paths, two answers


def test_a_prompt_the_base_learned_as_absent_can_become_a_class(base, ultrasound, tmp_path):
    from napari_vlsm.core.data.replay import REPLAY_DIR
    from napari_vlsm.core.data.training_sets import Example

    examples = [Example(*ex.load(), {"p1": "kidney"}, name=ex.name, group="mine")
                for ex in benchmark_examples(ultrasound, "train")[:2]]
    backend = load_model(str(base), "cpu", "fp32")
    card = json.loads((base / "vlsm_card.json").read_text())
    events = list(T.train(backend, examples, [], tmp_path / "run", T.TrainSettings(epochs=1),
                          replay=base / REPLAY_DIR, card=card))
    assert "as adapter 1" in events[-1].message
    cfg = load_model(str(tmp_path / "run" / "best"), "cpu", "fp32").module.config
    assert dict(zip(cfg.route_prompts, cfg.route_owners))["kidney"] == 1


def test_each_path_decodes_only_the_prompts_it_owns(base, ultrasound, polyp_image, tmp_path):
    """An adapter's prompt costs one decoder pass, not the base's as well; a prompt's answer
    does not depend on which other prompts are asked with it."""
    list(T.finetune(str(base), [ultrasound], tmp_path / "run", T.TrainSettings(epochs=1), device="cpu"))
    backend = load_model(str(tmp_path / "run" / "best"), "cpu", "fp32")
    module = backend.module
    calls = {"base": 0, "adapter": 0}
    module.head.register_forward_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1))
    module.adapters[0].head.register_forward_hook(lambda *_: calls.__setitem__("adapter", calls["adapter"] + 1))
    predictor = Predictor(backend, flip_average=False)
    predictor.set_image(polyp_image)
    alone = predictor.predict(["breast tumor"]).probs
    assert calls == {"base": 0, "adapter": 1}
    both = predictor.predict(["polyp", "breast tumor"]).probs
    assert calls == {"base": 1, "adapter": 2}
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(both[0], predictor.predict(["polyp"]).probs[0], atol=1e-5)
    assert not np.allclose(both[0], both[1], atol=1e-3)
