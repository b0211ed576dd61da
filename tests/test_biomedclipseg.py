"""BiomedCLIPSeg: BiomedCLIP's open_clip files (a small model of the hub's layout and shape,
built here with random weights) converted, checked against the benchmark's composition,
used for segmenting, finetuning and ONNX export through the documented commands."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.errors import ModelNotFoundError, UnsafeWeightsError
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.models.biomedclipseg.convert import PICKLED_WEIGHTS, convert, read_open_clip
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.models.random_models import build_random_open_clip
from napari_vlsm.core.models.biomedclipseg import new_biomedclipseg

from .conftest import CodeInPickle, small_copy

runner = CliRunner()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(open_clip folder, text tower folder), as two hub repositories would be downloaded."""
    root = tmp_path_factory.mktemp("hub")
    build_random_open_clip(root / "BiomedCLIP", "tiny", seed=1, text_folder=root / "BiomedBERT")
    return root / "BiomedCLIP", root / "BiomedBERT"


@pytest.fixture(scope="module")
def converted(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "biomedclipseg"
    res = runner.invoke(app, ["models", "convert", str(hub[0]), "--out", str(out), "--text-tower", str(hub[1])])
    assert res.exit_code == 0, res.output
    assert "untrained" in res.output
    return out


def test_conversion_writes_safetensors_and_reads_the_pickle_only_with_weights_only(hub, tmp_path, torch_load_calls):
    calls = torch_load_calls
    out = convert(hub[0], tmp_path / "model", text_dir=hub[1])
    assert calls == [True]
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vlsm_biomedclipseg" and config["context_length"] == 256
    assert json.loads((out / "vlsm_card.json").read_text())["title"].endswith("(untrained: finetune it first)")
    # the open_clip folder itself (a pickle) is still refused by the loader
    with pytest.raises(UnsafeWeightsError):
        load_model(str(hub[0] / PICKLED_WEIGHTS))


def test_a_pickle_holding_code_is_refused_and_never_run(tmp_path, hub):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "open_clip_config.json").write_text((hub[0] / "open_clip_config.json").read_text())
    torch.save({"visual.trunk.pos_embed": CodeInPickle(marker)}, evil / PICKLED_WEIGHTS)
    with pytest.raises(ModelNotFoundError, match="not a plain weights file"):
        read_open_clip(evil)
    assert not marker.exists()


def test_missing_text_tower_and_a_non_biomedclip_model_are_explained(hub, tmp_path):
    res = runner.invoke(app, ["models", "convert", str(hub[0]), "--out", str(tmp_path / "m")])
    assert res.exit_code != 0 and "--text-tower" in res.output and "Traceback" not in res.output
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((hub[0] / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["hf_pooler_type"] = "mean_pooler"
    (other / "open_clip_config.json").write_text(json.dumps(cfg))
    (other / PICKLED_WEIGHTS).write_bytes((hub[0] / PICKLED_WEIGHTS).read_bytes())
    res = runner.invoke(app, ["models", "convert", str(other), "--out", str(tmp_path / "m2"),
                              "--text-tower", str(hub[1])])
    assert res.exit_code != 0 and "BiomedCLIP-style models only" in res.output


# ---- the benchmark's composition, computed from the open_clip weights as timm and open_clip do ----

def _timm_vit_blocks(state: dict, pixels: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """timm's VisionTransformer forward (patch_embed, _pos_embed, blocks), every block's output."""
    p = "visual.trunk."
    patch = state[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, patch, state[p + "patch_embed.proj.bias"], stride=patch.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state[p + "pos_embed"]
    outs, width = [], x.shape[-1]
    for i in range(len({k.split(".")[3] for k in state if k.startswith(p + "blocks.")})):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(attn, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                         state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        outs.append(x)
    return outs


def _benchmark_probabilities(hub, converted, pixels, prompts, heads: int = 3) -> torch.Tensor:
    """medvlsm's BiomedCLIPEncCLIPSegDec.forward: hidden_states[i + 1] for CLIPSeg's extract
    layers, BERT's CLS state through open_clip's mlp projection (tokens padded to 256 as
    open_clip's tokenizer does), and a CLIPSeg decoder with the converted model's weights.
    ``heads``: timm's for the ViT (3 for vit_tiny, 12 for vit_base)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel, CLIPSegConfig, CLIPSegForImageSegmentation

    _, state = read_open_clip(hub[0])
    config = json.loads((converted / "config.json").read_text())
    hidden_states = _timm_vit_blocks(state, pixels, heads)
    decoder_config = CLIPSegConfig(**config["decoder_config"])
    activations = [hidden_states[i + 1] for i in decoder_config.extract_layers]

    bert = BertModel(BertConfig.from_pretrained(hub[1])).eval()  # with its pooler, as open_clip builds it
    bert.load_state_dict({k.removeprefix("text.transformer."): v for k, v in state.items()
                          if k.startswith("text.transformer.")})
    tok = AutoTokenizer.from_pretrained(hub[1])(prompts, padding="max_length", max_length=256, truncation=True,
                                                return_tensors="pt")
    mask = (tok["input_ids"] != 0).long()
    cls = bert(input_ids=tok["input_ids"], attention_mask=mask).last_hidden_state[:, 0]
    text = F.linear(F.gelu(F.linear(cls, state["text.proj.0.weight"])), state["text.proj.2.weight"])

    decoder = CLIPSegForImageSegmentation(decoder_config).decoder.eval()
    weights = load_file(str(converted / "model.safetensors"))
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in weights.items() if k.startswith("decoder.")})
    return torch.sigmoid(decoder(activations, text).logits)


def test_probabilities_match_the_benchmark_composition(hub, converted):
    backend = load_model(str(converted), device="cpu", dtype="fp32")
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    prompts = ["polyp", "a small round tumour in the breast ultrasound image"]
    with torch.no_grad():
        ours = torch.sigmoid(backend.forward(pixels, prompts))
        reference = _benchmark_probabilities(hub, converted, pixels, prompts)
    assert ours.shape == reference.shape == (2, 64, 64)
    assert (ours - reference).abs().max().item() < 1e-4
    assert ours.std().item() > 1e-3  # not a constant map that would match anything
    backend.module.config.block_offset = 0  # CLIPSeg's own indexing: the check must tell it apart
    with torch.no_grad():
        assert (torch.sigmoid(backend.forward(pixels, prompts)) - reference).abs().max().item() > 1e-3


def test_a_new_prompt_on_a_cached_image_runs_no_image_encoder(converted, polyp_image):
    backend = load_model(str(converted), device="cpu")
    calls = []
    backend.module.vision.embeddings.register_forward_hook(lambda *a: calls.append(1))
    predictor = Predictor(backend)
    predictor.set_image(polyp_image)
    assert len(calls) == 1
    first = predictor.predict(["polyp"]).probs
    second = predictor.predict(["tumor in the breast ultrasound image", "lesion"]).probs
    assert len(calls) == 1
    assert first.shape[1:] == second.shape[1:] == polyp_image.shape[:2]


def test_finetune_segment_and_export_with_the_documented_commands(hub, converted, data_sets, tmp_path):
    data = small_copy(data_sets / "kvasir_seg", tmp_path / "kvasir_seg", 4, 2)
    run = tmp_path / "run"
    res = runner.invoke(app, ["finetune", str(data), "--model", "new:biomedclipseg", "--encoders", str(converted),
                              "--train", "decoder", "--epochs", "1", "--batch-size", "2", "--out", str(run),
                              "--threads", "1"])
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "last" / "training.json").read_text())
    assert meta["settings"]["mode"] == "decoder" and meta["settings"]["lr"] == 2e-4
    trained = load_model(str(run / "best"), device="cpu")
    assert trained.name == "BiomedCLIPSeg"
    start = new_biomedclipseg(encoders=converted, device="cpu")  # where new:biomedclipseg starts (seed 0)
    pairs = list(zip(trained.module.named_parameters(), start.module.parameters()))
    assert len(pairs) == len(list(start.module.parameters())) and any(n.startswith("decoder.") for (n, _), _ in pairs)
    for (name, p), q in pairs:
        changed = not torch.equal(p, q)
        assert changed == name.startswith("decoder."), name  # encoders frozen, the decoder trained

    masks = tmp_path / "masks"
    res = runner.invoke(app, ["segment", str(data / "images"), "-p", "polyp", "--model", str(run / "best"),
                              "-o", str(masks)])
    assert res.exit_code == 0, res.output
    assert len(list(masks.glob("*.png"))) == 6

    onnx_dir = tmp_path / "onnx"
    res = runner.invoke(app, ["export-onnx", str(run / "best"), str(onnx_dir)])
    assert res.exit_code == 0, res.output
    exported = load_model(str(onnx_dir), device="cpu")
    image = (np.random.default_rng(0).random((90, 70, 3)) * 255).astype(np.uint8)
    a, b = Predictor(trained), Predictor(exported)
    a.set_image(image)
    b.set_image(image)
    prompts = ["polyp", "a small pink polyp in the colon"]
    assert np.abs(a.predict(prompts).probs - b.predict(prompts).probs).max() < 1e-3


def test_a_converted_folder_with_its_card_finetunes_as_documented(converted, data_sets, tmp_path):
    """models convert, then finetune DATA --model OUT (adapters auto): the card once sent it
    down the FiLM-UNet's adapter path (AttributeError: no route_prompts)."""
    assert (converted / "vlsm_card.json").exists()
    data = small_copy(data_sets / "kvasir_seg", tmp_path / "kvasir_seg", 2, 1)
    res = runner.invoke(app, ["finetune", str(data), "--model", str(converted), "--epochs", "1", "--batch-size", "1",
                              "--out", str(tmp_path / "run"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert load_model(str(tmp_path / "run" / "best"), device="cpu").name == "BiomedCLIPSeg"


def test_open_clip_folder_as_encoders_and_lora_and_full_training(hub, data_sets, tmp_path):
    import shutil

    from napari_vlsm.core.training.train import TrainSettings, finetune

    side_by_side = tmp_path / "open_clip"
    shutil.copytree(hub[0], side_by_side)
    for f in hub[1].iterdir():
        shutil.copy(f, side_by_side / f.name)
    data = small_copy(data_sets / "busi", tmp_path / "busi", 2, 1)
    start = new_biomedclipseg(encoders=side_by_side, device="cpu")
    encoders = {n: p for n, p in start.module.named_parameters() if n.startswith(("vision.", "text."))}
    for mode in ("lora", "full"):
        settings = TrainSettings(mode=mode, epochs=1, batch_size=2, threads=1, lr=1e-3)
        events = list(finetune("new:biomedclipseg", [data], tmp_path / mode, settings, device="cpu",
                               encoders=side_by_side))
        assert events[-1].kind == "done"
        reloaded = dict(load_model(str(tmp_path / mode / "best"), device="cpu").module.named_parameters())
        assert not any("lora" in n for n in reloaded)  # adapters merged into plain weights on save
        moved = [n for n, p in encoders.items() if not torch.equal(p, reloaded[n])]
        if mode == "lora":  # the attention projections that carry adapters, and nothing else
            assert moved and all(n.rsplit(".", 2)[-2] in ("q_proj", "v_proj", "query", "value") for n in moved)
        else:
            assert len(moved) > len(encoders) // 2


def test_pull_fetches_the_text_tower_and_converts(hub, tmp_path, monkeypatch):
    import huggingface_hub

    from napari_vlsm.core.models import registry
    repos = {"microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": hub[0],
             "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": hub[1]}
    asked = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        """A hub that serves only the files the patterns ask for."""
        from fnmatch import fnmatch

        asked.append(repo_id)
        served = tmp_path / "served" / repo_id.replace("/", "--") / str(len(list((tmp_path / "served").glob("*/*"))))
        served.mkdir(parents=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                (served / f.name).write_bytes(f.read_bytes())
        return str(served)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
    model_id = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    out = registry.pull(model_id)
    assert asked == [model_id, model_id, "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"]
    assert out == tmp_path / "hf_home" / "napari-vlsm" / model_id.replace("/", "--")
    asked.clear()
    assert registry.pull(model_id) == out and asked == [model_id]  # converted once
    assert load_model(model_id, device="cpu").name == "BiomedCLIPSeg"  # found again by its hub id
    assert any(m.spec == model_id and m.kind == "BiomedCLIPSeg" for m in registry.find_models())


def test_wrong_inputs_get_messages(hub, converted, tmp_path):
    from napari_vlsm.core.models.biomedclipseg.model import BiomedClipSegConfig

    with pytest.raises(ValueError, match="needs at least 11"):
        BiomedClipSegConfig(vision_config={"num_hidden_layers": 8})
    with pytest.raises(ModelNotFoundError, match="models convert"):
        load_model(str(hub[0]))
    res = runner.invoke(app, ["finetune", str(tmp_path), "--model", "default", "--encoders", str(hub[0]),
                              "--out", str(tmp_path / "run")])
    assert res.exit_code != 0 and "--encoders goes with a fresh model" in res.output
    res = runner.invoke(app, ["models", "convert", str(hub[0]), "--out", str(converted), "--text-tower", str(hub[1])])
    assert res.exit_code != 0 and "not empty" in res.output
    res = runner.invoke(app, ["models", "convert", str(hub[0]), "--out", str(tmp_path / "m"),
                              "--text-tower", str(converted)])  # a folder that is no BERT
    assert res.exit_code != 0 and "not BiomedCLIP's BERT text tower" in res.output

