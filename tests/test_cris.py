"""CRIS: a tiny random model of the release layout, checked against the benchmark's own
composition (written out below from CRIS.pytorch's model/ and medvlsm's cris_model/),
through the predictor, finetuning, the release-checkpoint converter and ONNX export."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_vlsm.core.models import cris as cris_family
from napari_vlsm.core.models.cris import model as cris
from napari_vlsm.core.models.cris.convert import convert_cris_checkpoint, read_release_checkpoint, write_release_checkpoint
from napari_vlsm.core.errors import ModelNotFoundError, UnsafeWeightsError
from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.images.postprocess import logits_to_probs
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.models.loading import load_model

from .conftest import CodeInPickle, open_docks
from napari_vlsm.core.training.loss import dice_bce_loss
from napari_vlsm.core.training.train import train_mode

PROMPTS = ["polyp", "a small pink polyp in the colon, left of the image"]


def _perturb(backend, seed: int) -> None:
    """Batch norms with random affine weights (CLIP's zero bn3 would switch the bottleneck
    branches off) and running statistics measured on random images, as a trained network's
    are, and a stronger attention-pool position grid: every part then shows in the output."""
    module = backend.module
    g = torch.Generator().manual_seed(seed)
    pool = module.backbone.visual.attnpool
    pool.positional_embedding.data.copy_(torch.randn(pool.positional_embedding.shape, generator=g))
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.reset_running_stats()
        m.momentum = None  # a plain average over the calibration batches
    module.train()
    for _ in range(2):
        backend.forward(torch.randn(4, 3, 64, 64, generator=g), PROMPTS * 2)
    module.eval()
    for m in norms:
        m.momentum = 0.1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = cris.build_random_cris(tmp_path_factory.mktemp("models") / "tiny_cris", seed=0)
    backend = cris.load(out, "cpu", torch.float32)
    with torch.no_grad():
        _perturb(backend, seed=1)
    backend.save(out)
    return out


def _backend(folder):
    return cris.load(folder, torch.device("cpu"), torch.float32, str(folder))


# ---- the benchmark's composition, written out from the original code --------------------------

def _ln(x, ln):
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps).to(x.dtype)


def _ref_bottleneck(b, x):
    out = F.relu(b.bn1(b.conv1(x)))
    out = F.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(b.avgpool(out)))
    return F.relu(out + (x if b.downsample is None else b.downsample(x)))


def _ref_attnpool(p, x):
    """CRIS's AttentionPool2d.forward (clip.py): resize_pos_embed + F.multi_head_attention_forward."""
    B, C, H, W = x.shape
    res = p.connect(x)
    x = x.reshape(B, C, -1)
    pos = p.positional_embedding.unsqueeze(0)
    g = p.spacial_dim
    grid = pos[:, -g * g:].reshape(1, g, g, pos.shape[2]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(H, W), align_corners=False, mode="bicubic")
    x = (x + torch.flatten(grid, 2).transpose(1, 2).transpose(-2, -1)).permute(2, 0, 1)
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=p.num_heads,
        q_proj_weight=p.q_proj.weight, k_proj_weight=p.k_proj.weight, v_proj_weight=p.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=p.c_proj.weight,
        out_proj_bias=p.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return F.relu(x.permute(1, 2, 0).reshape(B, -1, H, W) + res)


def _ref_encode_image(v, x):
    """ModifiedResNet.forward: (layer2, layer3, attnpool(layer4))."""
    for conv, bn in ((v.conv1, v.bn1), (v.conv2, v.bn2), (v.conv3, v.bn3)):
        x = F.relu(bn(conv(x)))
    x = F.avg_pool2d(x, 2)
    outs = []
    for stage in (v.layer1, v.layer2, v.layer3, v.layer4):
        for block in stage:
            x = _ref_bottleneck(block, x)
        outs.append(x)
    return outs[1], outs[2], _ref_attnpool(v.attnpool, outs[3])


def _ref_encode_text(bb, text, word_len):
    """CLIP.encode_text with CRIS's causal mask of word_len (length first, nn.MultiheadAttention)."""
    mask = torch.empty(word_len, word_len).fill_(float("-inf")).triu_(1)
    x = bb.token_embedding(text) + bb.positional_embedding[: text.shape[1]]
    x = x.permute(1, 0, 2)
    for blk in bb.transformer.resblocks:
        h = _ln(x, blk.ln_1)
        x = x + blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = blk.mlp.c_fc(_ln(x, blk.ln_2))
        x = x + blk.mlp.c_proj(h * torch.sigmoid(1.702 * h))
    x = _ln(x.permute(1, 0, 2), bb.ln_final)
    state = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ bb.text_projection
    return x, state


def _ref_neck(n, imgs, state):
    """FPN.forward."""
    v3, v4, v5 = imgs
    state = n.txt_proj(state).unsqueeze(-1).unsqueeze(-1)
    f5 = n.norm_layer(n.f1_v_proj(v5) * state)
    f4 = n.f2_cat(torch.cat([n.f2_v_proj(v4), F.interpolate(f5, scale_factor=2, mode="bilinear")], dim=1))
    f3 = n.f3_cat(torch.cat([F.avg_pool2d(n.f3_v_proj(v3), 2, 2), f4], dim=1))
    fq5 = F.interpolate(n.f4_proj5(f5), scale_factor=2, mode="bilinear")
    fq = n.aggr(torch.cat([n.f4_proj3(f3), n.f4_proj4(f4), fq5], dim=1))
    b, _, h, w = fq.shape  # CoordConv.add_coord
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    fq = torch.cat([fq, x.expand([b, 1, -1, -1]), y.expand([b, 1, -1, -1])], 1)
    return n.coordconv[1](n.coordconv[0].conv1(fq))


def _ref_pos1d(d_model, length):
    pe = torch.zeros(length, d_model)
    position = torch.arange(0, length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position.float() * div_term)
    pe[:, 1::2] = torch.cos(position.float() * div_term)
    return pe.unsqueeze(1)


def _ref_pos2d(d_model, height, width):
    pe = torch.zeros(d_model, height, width)
    d_model = int(d_model / 2)
    div_term = torch.exp(torch.arange(0.0, d_model, 2) * -(math.log(10000.0) / d_model))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    pe[0:d_model:2] = torch.sin(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, height, 1)
    pe[1:d_model:2] = torch.cos(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, height, 1)
    pe[d_model::2] = torch.sin(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, width)
    pe[d_model + 1::2] = torch.cos(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, width)
    return pe.reshape(-1, 1, height * width).permute(2, 1, 0)


def _ref_decoder(d, vis, txt, pad_mask):
    """TransformerDecoder.forward and TransformerDecoderLayer.forward."""
    B, C, H, W = vis.shape
    vis_pos, txt_pos = _ref_pos2d(C, H, W), _ref_pos1d(txt.shape[-1], txt.shape[1])
    vis, txt = vis.reshape(B, C, -1).permute(2, 0, 1), txt.permute(1, 0, 2)
    for layer in d.layers:
        vis2 = layer.norm1(vis)
        q = k = vis2 + vis_pos
        vis = vis + layer.self_attn_norm(layer.self_attn(q, k, value=vis2)[0])
        vis2 = layer.norm2(vis)
        vis2 = layer.multihead_attn(query=vis2 + vis_pos, key=txt + txt_pos, value=txt, key_padding_mask=pad_mask)[0]
        vis = vis + layer.cross_attn_norm(vis2)
        vis = vis + layer.ffn(layer.norm3(vis))
    return d.norm(vis).permute(1, 2, 0)


def _ref_projector(p, x, word):
    """Projector.forward: the grouped convolution with one kernel per sample."""
    x = p.vis(x)
    B, C, H, W = x.shape
    x = x.reshape(1, B * C, H, W)
    word = p.txt(word)
    weight, bias = word[:, :-1].reshape(B, C, p.kernel_size, p.kernel_size), word[:, -1]
    return F.conv2d(x, weight, padding=p.kernel_size // 2, groups=weight.size(0), bias=bias).transpose(0, 1)


def _benchmark_logits(module, pixels, prompts, tokenizer, use_pad_mask=True, padding="zero"):
    """CRIS.forward (segmenter.py) on token rows of context_length 77 and pad_mask =
    input_ids == 0, the rows made as the weights' trainer made them: padding "zero" is
    CRIS.pytorch's tokenizer (0 at padding); "eot" is medvlsm's image_text_mask.py, the CLIPSeg
    tokenizer with padding="max_length", whose pad token is <|endoftext|> (49407), taken as is."""
    cfg = module.config
    tok = tokenizer(prompts, padding="max_length", max_length=cfg.context_length, truncation=True,
                    return_tensors="pt")
    if padding == "eot":
        input_ids = tok["input_ids"]
        assert input_ids[0, -1].item() == 49407  # the tokenizer's own padding, as the benchmark feeds it
    else:
        input_ids = tok["input_ids"].masked_fill(tok["attention_mask"] == 0, 0)
    pad_mask = torch.zeros_like(input_ids).masked_fill_(input_ids == 0, 1).bool()
    vis = _ref_encode_image(module.backbone.visual, pixels)
    words, state = _ref_encode_text(module.backbone, input_ids, cfg.context_length)
    fq = _ref_neck(module.neck, vis, state)
    b, c, h, w = fq.size()
    fq = _ref_decoder(module.decoder, fq, words, pad_mask if use_pad_mask else None).reshape(b, c, h, w)
    pred = _ref_projector(module.proj, fq, state)
    return F.interpolate(pred, cfg.image_size, mode="bicubic", align_corners=True)[:, 0]


def test_predictor_matches_the_benchmark_composition(folder, polyp_image):
    backend = _backend(folder)
    predictor = Predictor(backend)
    predictor.set_image(polyp_image)
    ours = predictor.predict(PROMPTS).probs
    with torch.no_grad():
        pixels = backend.preprocess([polyp_image])
        reference = _benchmark_logits(backend.module, pixels.expand(len(PROMPTS), -1, -1, -1), PROMPTS,
                                      backend.tokenizer)
        unmasked = _benchmark_logits(backend.module, pixels.expand(len(PROMPTS), -1, -1, -1), PROMPTS,
                                     backend.tokenizer, use_pad_mask=False)
    size = polyp_image.shape[:2]
    assert ours.shape == (2, *size)
    assert np.abs(ours - logits_to_probs(reference, size)).max() < 1e-4
    assert ours.std() > 1e-3  # not a constant map that would match anything
    # the check tells a known detail apart: attending to the padding words moves the masks
    assert np.abs(ours - logits_to_probs(unmasked, size)).max() > 1e-3


def test_save_and_reload_give_the_same_model(folder, tmp_path):
    a = _backend(folder)
    a.save(tmp_path / "again")
    names = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    b = _backend(tmp_path / "again")
    assert b.module.config.model_type == "vlsm_cris" and b.input_size == (64, 64)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.forward(pixels, PROMPTS), b.forward(pixels, PROMPTS))


def test_a_new_prompt_on_a_cached_image_runs_no_image_encoder(folder, polyp_image):
    backend = _backend(folder)
    calls = []
    backend.module.backbone.visual.register_forward_hook(lambda *a: calls.append(1))
    predictor = Predictor(backend)
    predictor.set_image(polyp_image)
    assert len(calls) == 1
    first = predictor.predict(["polyp"]).probs
    second = predictor.predict(["tumor in the breast ultrasound image", "polyp", "lesion"]).probs
    assert len(calls) == 1
    np.testing.assert_allclose(first[0], second[1], atol=1e-5)  # the cached text row: the same mask


def test_padding_to_the_fixed_length_changes_nothing(folder):
    backend = _backend(folder)
    module, cfg = backend.module, backend.module.config
    prompt = "a small pink polyp"
    with torch.no_grad():
        alone = backend.encode_text([prompt])
        beside = backend.encode_text([prompt, "a long prompt that pads the short one with many more tokens"])
        assert alone.shape == (1, cfg.context_length * cfg.text_width + cfg.context_length + cfg.embed_dim)
        assert torch.allclose(alone[0], beside[0], atol=1e-6)
        feats = backend.encode_image(torch.randn(1, 3, 64, 64))
        padded = backend.decode(feats, alone)
        # the text transformer at the prompt's own length (no padding at all), no pad mask
        ids = backend.tokenizer([prompt], return_tensors="pt")["input_ids"]
        words, state = module.backbone.encode_text(ids)
        unpadded = module.decode_parts(feats, words, torch.zeros_like(ids, dtype=torch.bool), state)
    assert ids.shape[1] < cfg.context_length
    assert (padded - unpadded).abs().max().item() < 1e-4  # float rounding only (logits of std ~3)


@pytest.mark.parametrize("mode", ["decoder", "full", "lora"])
def test_one_finetuning_step_changes_the_right_parameters(folder, tmp_path, mode):
    backend = _backend(folder)
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    params = backend.trainable_parameters(mode)
    opt = torch.optim.AdamW(params, lr=1e-2)
    train_mode(backend.module)
    pixels = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 64, 64) > 0.5).float()
    loss = dice_bce_loss(backend.forward(pixels, PROMPTS), target)
    loss.backward()
    opt.step()
    backend.save(tmp_path / mode)  # LoRA merged into plain weights
    after = _backend(tmp_path / mode).module.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    heads = {k for k in changed if k.startswith(("neck.", "decoder.", "proj."))}
    assert heads and any(k.startswith("proj.txt.") for k in heads)
    backbone = changed - heads
    if mode == "decoder":
        assert not backbone  # weights and batch-norm statistics of the encoders stay
    elif mode == "full":
        assert any(k.startswith("backbone.visual.layer") for k in backbone)
        assert any(k.startswith("backbone.transformer.") for k in backbone)
    else:
        layers = {k.rsplit(".", 2)[-2] for k in backbone}
        assert backbone and layers <= set(cris.LORA_TARGETS), layers
        assert any(".attnpool." in k for k in backbone) and any(".resblocks." in k for k in backbone)


def test_a_training_batch_of_one_image_works(folder):
    """The neck's BatchNorm1d on the sentence state has no batch statistics for one sample."""
    backend = _backend(folder)
    backend.trainable_parameters("decoder")
    train_mode(backend.module)
    logits = backend.forward(torch.randn(1, 3, 64, 64), ["polyp"])
    assert logits.shape == (1, 64, 64) and torch.isfinite(logits).all()


def test_a_release_checkpoint_converts_and_loads(folder, tmp_path, torch_load_calls):
    backend = _backend(folder)
    ckpt = write_release_checkpoint(backend, tmp_path / "best_model.pth")
    raw = torch.load(ckpt, weights_only=True)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    calls = torch_load_calls
    calls.clear()  # the look at the file above
    out = convert_cris_checkpoint(ckpt, tmp_path / "converted", image_size=64)  # the weights do not tell it
    assert calls == [True]
    assert not (tmp_path / "converted.partial").exists()
    converted = cris.load(out, "cpu", torch.float32)
    ignore = {"transformers_version": None, "_name_or_path": None}
    assert converted.module.config.to_dict() | ignore == backend.module.config.to_dict() | ignore
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted.forward(pixels, ["polyp"]), backend.forward(pixels, ["polyp"]))
    with pytest.raises(ModelNotFoundError, match="not empty"):
        convert_cris_checkpoint(ckpt, out)
    # medvlsm's cris_best_single.pth: the bare state dict, no prefix; its Lightning module's: "net."
    for prefix in ("", "net."):
        torch.save({prefix + k: v for k, v in backend.module.state_dict().items()}, tmp_path / "single.pth")
        assert read_release_checkpoint(tmp_path / "single.pth").keys() == backend.module.state_dict().keys()
    # a checkpoint with a tensor missing is refused by name
    del raw["state_dict"]["module.proj.txt.bias"]
    torch.save(raw, tmp_path / "cut.pth")
    with pytest.raises(ModelNotFoundError, match="missing, e.g. proj.txt.bias"):
        convert_cris_checkpoint(tmp_path / "cut.pth", tmp_path / "cut")
    assert not (tmp_path / "cut").exists()


def test_a_checkpoint_holding_code_is_refused_and_never_run(folder, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "best_model.pth"
    torch.save({"epoch": 1, "state_dict": {"module.neck.txt_proj.0.weight": CodeInPickle(marker)}}, evil)
    with pytest.raises(UnsafeWeightsError, match="not a plain weights file .*io.open.* nothing in it ran"):
        convert_cris_checkpoint(evil, tmp_path / "out")
    with pytest.raises(UnsafeWeightsError):
        cris_family.new_cris("cpu", encoders=evil)
    # the same in a protocol-5 file, which goes past torch's reader to the tensors-only one
    torch.save({"module.neck.txt_proj.0.weight": CodeInPickle(marker)}, tmp_path / "p5.pth", pickle_protocol=5)
    with pytest.raises(UnsafeWeightsError, match=r"not a plain weights file \(its weights hold io.open"):
        convert_cris_checkpoint(tmp_path / "p5.pth", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


class SystemCall:
    """Unpickled, it would run a shell command: torch blocks os/posix by module."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_the_refusal_names_the_true_reason(tmp_path, zipped):
    """torch says "Trying to load unsupported GLOBAL posix.system whose module posix is
    blocked" (lower-case "unsupported"); the message gives that line, not torch's link."""
    marker = tmp_path / "ran"
    path = tmp_path / "best_model.pth"
    torch.save({"state_dict": {"module.proj.txt.bias": SystemCall(marker)}}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeWeightsError) as info:
        read_release_checkpoint(path)
    message = str(info.value)
    assert "system" in message.split("nothing in it ran")[0], message
    assert "https://" not in message and "documentation" not in message
    assert not marker.exists()


def test_an_old_format_protocol_5_file_is_not_called_code(folder, tmp_path):
    torch.save(dict(_backend(folder).module.state_dict()), tmp_path / "old.pth", pickle_protocol=5,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ModelNotFoundError, match=r"old \(non-zip\) format .*Unsupported operand 149") as info:
        read_release_checkpoint(tmp_path / "old.pth")
    assert "arbitrary code" not in str(info.value)


class AttributeDict(dict):
    """Stands for Lightning's AttributeDict, the class of a checkpoint's hyper_parameters."""


def _benchmark_checkpoint(module, path, marker=None, threshold=0.35):
    """A checkpoint as the benchmark's own runs leave them: the Lightning module's state dict
    (every key "net."), its hyper_parameters holding the loss and optimizer objects and the
    threshold, saved with pickle protocol 5 (medvlsm's convert_cris_model.py protocol)."""
    import functools

    hp = AttributeDict(threshold=threshold, multi_class=False, scheduler_monitor="val_loss",
                       optimizer=functools.partial(torch.optim.AdamW, lr=2e-5, weight_decay=1e-3),
                       loss_fn=torch.nn.BCEWithLogitsLoss())
    if marker is not None:
        hp["callback"] = CodeInPickle(marker)  # code where the weights are not: never run either
    torch.save({"epoch": 12, "global_step": 300, "pytorch-lightning_version": "2.0.2",
                "state_dict": {"net." + k: v for k, v in module.state_dict().items()},
                "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hp},
               path, pickle_protocol=5)
    return path


def test_a_benchmark_checkpoint_converts_and_reads_prompts_its_way(folder, tmp_path, polyp_image):
    backend = _backend(folder)
    marker = tmp_path / "ran"
    ckpt = _benchmark_checkpoint(backend.module, tmp_path / "epoch_012.ckpt", marker, threshold=0.4)
    with pytest.raises(Exception, match="Unsupported operand 149"):  # torch's own reader gives up on it
        torch.load(ckpt, weights_only=True)
    out = convert_cris_checkpoint(ckpt, tmp_path / "converted", image_size=64)
    assert not marker.exists()
    converted = cris.load(out, "cpu", torch.float32)
    assert converted.module.config.text_padding == "eot"
    card = json.loads((out / "vlsm_card.json").read_text())
    assert card["threshold"] == 0.4 and card["converted_from"]["threshold_from"] == "the checkpoint's hyper_parameters"
    assert "io.open" in card["converted_from"]["not_loaded"]
    sa, sb = backend.module.state_dict(), converted.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    predictor = Predictor(converted)
    predictor.set_image(polyp_image)
    ours = predictor.predict(PROMPTS).probs
    with torch.no_grad():
        pixels = converted.preprocess([polyp_image]).expand(len(PROMPTS), -1, -1, -1)
        benchmark = _benchmark_logits(converted.module, pixels, PROMPTS, converted.tokenizer, padding="eot")
        zero = _benchmark_logits(converted.module, pixels, PROMPTS, converted.tokenizer, padding="zero")
    size = polyp_image.shape[:2]
    assert np.abs(ours - logits_to_probs(benchmark, size)).max() < 1e-4
    assert np.abs(ours - logits_to_probs(zero, size)).max() > 1e-3  # the padding does show
    # the same prompt alone or beside a longer one: still the same row (padded to 77 either way)
    with torch.no_grad():
        alone, beside = converted.encode_text([PROMPTS[0]]), converted.encode_text(PROMPTS)
    assert torch.allclose(alone[0], beside[0], atol=1e-6)
    # the option overrides what the keys tell
    again = convert_cris_checkpoint(ckpt, tmp_path / "as_zero", image_size=64, text_padding="zero", threshold=0.5)
    assert cris.CrisConfig.from_pretrained(again).text_padding == "zero"
    assert json.loads((again / "vlsm_card.json").read_text())["threshold"] == 0.5


def test_medvlsm_single_checkpoint_protocol_5_converts_with_zero_padding(folder, tmp_path):
    """convert_cris_model.py's output: CRIS.pytorch's weights, bare, pickle protocol 5."""
    backend = _backend(folder)
    torch.save(dict(backend.module.state_dict()), tmp_path / "cris_best_single.pth", pickle_protocol=5)
    out = convert_cris_checkpoint(tmp_path / "cris_best_single.pth", tmp_path / "converted", image_size=64)
    converted = cris.load(out, "cpu", torch.float32)
    assert converted.module.config.text_padding == "zero"
    assert json.loads((out / "vlsm_card.json").read_text())["threshold"] == cris.BENCHMARK_THRESHOLD
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted.forward(pixels, ["polyp"]), backend.forward(pixels, ["polyp"]))


def test_a_converted_folder_threshold_reaches_segment(folder, tmp_path, polyp_image):
    from PIL import Image
    from typer.testing import CliRunner

    from napari_vlsm.cli import app
    from napari_vlsm.core.inference.folder_labeling import default_threshold, model_threshold

    ckpt = write_release_checkpoint(_backend(folder), tmp_path / "best_model.pth")
    out = convert_cris_checkpoint(ckpt, tmp_path / "cris", image_size=64)
    assert model_threshold(out) == default_threshold(str(out)) == 0.35
    assert model_threshold(tmp_path) is None and default_threshold(str(tmp_path)) == 0.5
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(polyp_image).save(images / "frame.png")
    runner = CliRunner()
    for args, want in (([], 0.35), (["--threshold", "0.6"], 0.6)):
        masks = tmp_path / f"masks{want}"
        res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(out), "-o", str(masks),
                                  *args])
        assert res.exit_code == 0, res.output
        assert json.loads((masks / "labels.json").read_text())["threshold"] == want
    from napari_vlsm.core.images.imageio import read_mask

    predictor = Predictor(cris.load(out, "cpu", torch.float32))
    predictor.set_image(polyp_image)
    probs = predictor.predict(["polyp"]).probs[0]
    assert ((probs > 0.35) != (probs > 0.5)).any()  # the mask tells 0.35 from the 0.5 it would be otherwise
    np.testing.assert_array_equal(read_mask(tmp_path / "masks0.35" / "frame.png") > 0, probs > 0.35)


def test_new_cris_from_a_checkpoint_or_a_folder(folder, tmp_path):
    ckpt = write_release_checkpoint(_backend(folder), tmp_path / "best_model.pth")
    for encoders in (ckpt, folder):
        backend = cris_family.new_cris("cpu", encoders=encoders)
        assert backend.source == "new:cris" and backend.dtype == torch.float32
        assert backend.default_train_mode == "decoder" and backend.default_lr["decoder"] == 2e-5
    with pytest.raises(ModelNotFoundError, match="encoders=CKPT"):
        cris_family.new_cris("cpu")
    # CLIP's RN50.pt is a TorchScript archive, which torch.load(weights_only=True) does not run
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "RN50.pt")
    with pytest.raises(ModelNotFoundError, match="cannot be read as a CRIS checkpoint.*not CLIP's RN50.pt"):
        cris_family.new_cris("cpu", encoders=tmp_path / "RN50.pt")


def test_onnx_export_matches_torch(folder, tmp_path, polyp_image):
    from napari_vlsm.core.models.loading import load_model
    from napari_vlsm.core.models.onnx_backend import OnnxBackend
    from napari_vlsm.core.models.onnx_export import export

    export(_backend(folder), tmp_path / "onnx")
    exported = load_model(tmp_path / "onnx")
    assert isinstance(exported, OnnxBackend) and exported.name == "ONNX CRIS"
    ours, ref = Predictor(exported), Predictor(_backend(folder))
    for p in (ours, ref):
        p.set_image(polyp_image)
    prompts = PROMPTS + ["lesion"]  # three prompts: another batch than the export's two
    np.testing.assert_allclose(ours.predict(prompts).probs, ref.predict(prompts).probs, atol=1e-4)
    other = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    got, want = ours.predict_batch([polyp_image, other, other], ["polyp"]), ref.predict_batch([polyp_image, other,
                                                                                                 other], ["polyp"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.probs, w.probs, atol=1e-4)


def test_onnx_export_of_an_eot_folder_pads_its_way(folder, tmp_path, polyp_image):
    import shutil

    from napari_vlsm.core.models.onnx_export import export

    eot = shutil.copytree(folder, tmp_path / "eot")
    config = json.loads((eot / "config.json").read_text())
    (eot / "config.json").write_text(json.dumps({**config, "text_padding": "eot"}))
    export(_backend(eot), tmp_path / "onnx")
    ours, ref, zero = Predictor(load_model(tmp_path / "onnx")), Predictor(_backend(eot)), Predictor(_backend(folder))
    for p in (ours, ref, zero):
        p.set_image(polyp_image)
    prompts = PROMPTS + ["lesion"]
    got = ours.predict(prompts).probs
    np.testing.assert_allclose(got, ref.predict(prompts).probs, atol=1e-4)
    assert np.abs(got - zero.predict(prompts).probs).max() > 1e-3


def test_family_spec_and_config_checks():
    fam = cris_family.FAMILY
    assert (fam.model_type, fam.name, fam.new_spec, fam.new_needs_encoders, fam.adapters) == \
        ("vlsm_cris", "CRIS", "new:cris", True, False)
    assert fam.train_modes == ("decoder", "full", "lora")
    release = cris.CrisConfig()
    assert (release.image_size, release.context_length, release.vision_heads, release.fpn_in) == \
        (416, 77, 32, [512, 1024, 1024])
    with pytest.raises(ValueError, match="fpn_in"):
        cris.CrisConfig(vision_width=32)
    with pytest.raises(ValueError, match="must be equal"):
        cris.CrisConfig(vis_dim=256)
    assert release.text_padding == "zero"  # folders from before the setting read as they did
    with pytest.raises(ValueError, match="text_padding is zero or eot"):
        cris.CrisConfig(text_padding="pad")


def test_the_trainer_finetunes_it_with_a_last_batch_of_one(folder, data_sets, tmp_path):
    from napari_vlsm.core.training.train import TrainSettings, train, training_data

    from .conftest import small_copy

    train_set, val_set = training_data([small_copy(data_sets / "kvasir_seg", tmp_path / "kvasir", 3, 1)])
    backend = _backend(folder)
    events = list(train(backend, train_set, val_set, tmp_path / "run", TrainSettings(epochs=1, batch_size=2,
                                                                                     threads=1)))
    assert events[-1].kind == "done"
    trained = cris.load(tmp_path / "run" / "best", "cpu", torch.float32).module.state_dict()
    start = _backend(folder).module.state_dict()
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(k.startswith(("neck.", "decoder.", "proj.")) for k in changed)  # "decoder" by default


def test_bf16_runs_and_agrees_with_fp32(folder, polyp_image):
    probs = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = Predictor(cris.load(folder, torch.device("cpu"), dtype))
        p.set_image(polyp_image)
        probs[dtype] = p.predict(PROMPTS).probs
    assert np.isfinite(probs[torch.bfloat16]).all()
    assert np.abs(probs[torch.float32] - probs[torch.bfloat16]).mean() < 0.05


def test_the_documented_commands_on_a_release_shaped_checkpoint(folder, data_sets, tmp_path, polyp_image):
    """models convert-cris, segment with the folder, and finetune new:cris --encoders CKPT, as
    docs/model_families.md writes them."""
    from typer.testing import CliRunner

    from napari_vlsm.cli import app
    from PIL import Image

    from .conftest import small_copy

    ckpt = write_release_checkpoint(_backend(folder), tmp_path / "best_model.pth")
    runner = CliRunner()
    res = runner.invoke(app, ["models", "convert-cris", str(ckpt), "--out", str(tmp_path / "cris"), "--image-size",
                              str(cris.CrisConfig.from_pretrained(folder).image_size)])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "cris", "cpu").name == "CRIS"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(polyp_image).save(images / "frame.png")
    res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "--model", str(tmp_path / "cris"),
                              "--out", str(tmp_path / "masks")])
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "masks" / "frame.png").shape == polyp_image.shape[:2]
    data = small_copy(data_sets / "kvasir_seg", tmp_path / "kvasir", 3, 1)
    res = runner.invoke(app, ["finetune", str(data), "--model", "new:cris", "--encoders", str(ckpt), "--epochs", "1",
                              "--batch-size", "2", "--out", str(tmp_path / "run"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "run" / "best", "cpu").name == "CRIS"
    res = runner.invoke(app, ["models", "convert-cris", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_a_converted_folder_threshold_reaches_the_dock(folder, tmp_path, make_napari_viewer, tiny_unet):
    """Choosing a converted CRIS folder in the segmentation dock sets its threshold (0.35);
    choosing a model without one goes back to 0.5."""
    ckpt = write_release_checkpoint(_backend(folder), tmp_path / "best_model.pth")
    out = convert_cris_checkpoint(ckpt, tmp_path / "cris", image_size=64)
    (seg,) = open_docks(make_napari_viewer(), "segment", model=out)
    assert seg.threshold.value() == 35 and seg.threshold_label.text() == "0.35"
    seg.add_model(str(tiny_unet))
    assert seg.threshold.value() == 50 and seg.threshold_label.text() == "0.50"
