"""Turn a CRIS release checkpoint into a CRIS model folder, once, in safetensors.

CRIS.pytorch saves ``torch.save({"epoch", "cur_iou", "best_iou", "prec", "state_dict",
"optimizer", "scheduler"})`` from a DistributedDataParallel model, so every key starts with
``module.``; medvlsm's ``scripts/convert_cris_model.py`` turns that into the bare state dict
its ``cris_pretrain`` reads. Both are pickles. This module reads one ONCE with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses
any other object, so the file cannot run code; a file that holds more than that is refused
with ``UnsafeWeightsError``. The network's parameter names are CRIS's own (``cris.py``), so
the only key mapping is dropping ``module.`` (or ``net.``, the prefix of a state dict taken
from medvlsm's Lightning module). What is written is safetensors.
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import torch

from napari_vlsm.core.errors import ModelNotFoundError, UnsafeWeightsError

RELEASE_PREFIX = "module."  # DistributedDataParallel's
# wrappers whose prefix is dropped when every key has it: DataParallel's, medvlsm's Lightning module's
WRAPPER_PREFIXES = (RELEASE_PREFIX, "net.")


def read_release_checkpoint(path) -> dict[str, torch.Tensor]:
    """The CRIS state dict of a release checkpoint (``{"state_dict": ...}`` or a bare state
    dict, its keys with or without ``module.`` / ``net.``), under the names of
    ``CrisForImageSegmentation``."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a TorchScript archive is refused below; torch's note on it is noise
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the safe reader met an object it does not rebuild
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln), lines[-1] if lines else type(exc).__name__)[:200]
        raise UnsafeWeightsError(
            f"{path} is not a plain weights file ({why}), so it was not loaded and nothing in it ran: unpickling "
            "it could run arbitrary code. A CRIS checkpoint holds only tensors and numbers; get the file again "
            "from its release page, or, only if you trust where it came from, re-save its weights alone on "
            "another machine (torch.save(torch.load(CKPT, weights_only=False)['state_dict'], 'cris_weights.pth')) "
            "and convert that.") from None
    except Exception as exc:  # not a torch file, a TorchScript archive (CLIP's RN50.pt), a cut-off download
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelNotFoundError(f"{path} cannot be read as a CRIS checkpoint ({why}). Give CRIS.pytorch's "
                                 "best_model.pth (or medvlsm's cris_best_single.pth), not CLIP's RN50.pt.") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelNotFoundError(f"{path} holds no state dict of tensors; it is not a CRIS checkpoint.")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _count(state: dict, prefix: str, part: int) -> int:
    return len({k.split(".")[part] for k in state if k.startswith(prefix)})


def config_from_state(state: dict, **overrides):
    """A CrisConfig read from the weights' shapes, CLIP's head conventions (text heads =
    width / 64, attention-pool heads = width * 32 / 64) and CRIS's 8 decoder heads;
    ``overrides`` for what the weights cannot tell."""
    from napari_vlsm.core.models.cris.model import CrisConfig

    need = ["backbone.visual.layer1.0.conv1.weight", "backbone.visual.attnpool.positional_embedding",
            "backbone.text_projection", "backbone.positional_embedding", "neck.f1_v_proj.0.weight",
            "decoder.norm.weight", "proj.txt.weight", "decoder.layers.0.ffn.0.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ModelNotFoundError(f"This is not a CRIS (CLIP ResNet) checkpoint: it has no {missing[0]}.")
    text_width = state["backbone.ln_final.weight"].shape[0]
    grid = round((state["backbone.visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    fpn = [state[f"neck.{n}.0.weight"].shape for n in ("f3_v_proj", "f2_v_proj", "f1_v_proj")]
    cfg = dict(vision_layers=[_count(state, f"backbone.visual.layer{i}.", 3) for i in range(1, 5)],
               vision_width=state["backbone.visual.layer1.0.conv1.weight"].shape[0],
               embed_dim=state["backbone.text_projection"].shape[1], attnpool_grid=grid,
               text_width=text_width, text_layers=_count(state, "backbone.transformer.resblocks.", 3),
               text_heads=max(1, text_width // 64), vocab_size=state["backbone.token_embedding.weight"].shape[0],
               context_length=state["backbone.positional_embedding"].shape[0],
               fpn_in=[s[1] for s in fpn], fpn_out=[s[0] for s in fpn], vis_dim=state["decoder.norm.weight"].shape[0],
               word_dim=state["proj.txt.weight"].shape[1], num_layers=_count(state, "decoder.layers.", 2),
               num_head=8, dim_ffn=state["decoder.layers.0.ffn.0.weight"].shape[0])
    cfg.update(overrides)
    try:
        return CrisConfig(**cfg)
    except ValueError as exc:
        raise ModelNotFoundError(f"The checkpoint's shapes are not a CRIS's: {exc}") from None


def module_from_state(state: dict, source, **overrides):
    """A CrisForImageSegmentation holding ``state``; every tensor must fit, none may be left over."""
    from napari_vlsm.core.models.cris.model import CrisForImageSegmentation
    from napari_vlsm.core.models.loading import quiet_transformers

    quiet_transformers()
    module = CrisForImageSegmentation(config_from_state(state, **overrides))
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape differs
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).strip())[:240]
        raise ModelNotFoundError(f"The weights in {source} do not fit a CRIS of the shape they describe "
                                 f"({first}).") from None
    if missing or unexpected:
        what = (f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else
                f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise ModelNotFoundError(f"The weights in {source} are not a complete CRIS ({what}); nothing was converted.")
    return module.eval()


def backend_from_checkpoint(path, device="cpu", **overrides):
    """A CrisBackend (fp32) from a release checkpoint, with the CLIP tokenizer."""
    from napari_vlsm.core.models.cris.model import CrisBackend
    from napari_vlsm.core.models.processors import load_tokenizer

    module = module_from_state(read_release_checkpoint(path), path, **overrides)
    return CrisBackend(module, load_tokenizer(), torch.device(device), torch.float32, str(path))


def convert_cris_checkpoint(path, out_folder, **overrides) -> Path:
    """Write a CRIS model folder (config.json, model.safetensors, tokenizer) to ``out_folder``:
    it must be new or empty; it appears only when complete."""
    out = Path(out_folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelNotFoundError(f"{out} is not empty; choose a new folder for the converted model.")
    backend = backend_from_checkpoint(path, **overrides)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    try:
        backend.save(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_release_checkpoint(backend_or_module, path, prefix: str = RELEASE_PREFIX) -> Path:
    """Write a checkpoint in CRIS.pytorch's release layout (``module.`` keys under
    "state_dict", with the epoch, scores and scheduler state a training run saves beside
    them) from a CRIS backend or module: for tests, and to hand a finetuned model back to
    CRIS.pytorch."""
    from collections import Counter

    from napari_vlsm.core.models.clipseg import merged_state_dict

    module = getattr(backend_or_module, "module", backend_or_module)
    state = {prefix + k: v.cpu() for k, v in merged_state_dict(module).items()}
    torch.save({"epoch": 50, "cur_iou": 0.0, "best_iou": 0.0, "prec": {"Pr@50": 0.0},
                "state_dict": state, "scheduler": {"milestones": Counter({35: 1}), "gamma": 0.1, "last_epoch": 50}},
               Path(path))
    return Path(path)

