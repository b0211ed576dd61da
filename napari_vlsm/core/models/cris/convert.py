"""Turn a CRIS checkpoint into a CRIS model folder, once, in safetensors.

Three kinds of file hold CRIS weights, all pickles written by ``torch.save``:

* CRIS.pytorch's release (``best_model.pth``): ``{"epoch", "cur_iou", "best_iou", "prec",
  "state_dict", "optimizer", "scheduler"}`` from a DistributedDataParallel model, so every key
  starts with ``module.``; trained on prompts padded with 0.
* medvlsm's ``scripts/convert_cris_model.py`` output (``cris_best_single.pth``): the same weights
  as a bare state dict without ``module.``, saved with ``pickle_protocol=5``.
* medvlsm's own finetuned CRIS: a Lightning checkpoint whose state dict keys start with ``net.``
  (its ``BaseModule.net``) and whose ``hyper_parameters`` hold the loss and optimizer objects and
  the threshold; trained on prompts padded with <|endoftext|> (``model.py``'s docstring).

Reading. First ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
and refuses any other object. It also refuses pickle protocol 4 and 5 files outright ("Unsupported
operand 149": the FRAME opcode), and Lightning's hyper-parameters. Such a zip-format file is then
read by ``read_tensors_only``: Python's unpickler with a ``find_class`` that returns only our
own tensor rebuilders and plain containers, and for every other name an inert placeholder class
that is never imported and whose instances do nothing. Nothing from the file runs either way.
A placeholder inside the state dict means the file is not plain weights: it is refused
(``UnsafeWeightsError``, naming what it asked for); placeholders elsewhere in a training
checkpoint (the optimizer, Lightning's hyper-parameters) are dropped with the rest.

The network's parameter names are CRIS's own (``cris.py``), so the only key mapping is dropping
the wrapper's prefix, which also tells how the weights were trained: ``net.`` the benchmark's
end-of-text padding, ``module.`` or none CRIS.pytorch's zero padding (an option overrides). The
folder records it in its config (``text_padding``) and its threshold (the benchmark's 0.35, or a
Lightning checkpoint's own) in vlsm_card.json. What is written is safetensors.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import warnings
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from napari_vlsm.core.errors import ModelNotFoundError, UnsafeWeightsError

RELEASE_PREFIX = "module."  # DistributedDataParallel's
BENCHMARK_PREFIX = "net."  # medvlsm's Lightning module's
# wrappers whose prefix is dropped when every key has it: DataParallel's, medvlsm's Lightning module's
WRAPPER_PREFIXES = (RELEASE_PREFIX, BENCHMARK_PREFIX)
# which text padding the weights of each wrapper were trained with (model.py's docstring)
PADDING_OF_WRAPPER = {RELEASE_PREFIX: "zero", BENCHMARK_PREFIX: "eot", "": "zero"}
TRAINED_BY = {RELEASE_PREFIX: "CRIS.pytorch (keys start with module.)",
              BENCHMARK_PREFIX: "the medvlsm benchmark (a Lightning state dict: keys start with net.)",
              "": "CRIS.pytorch (a bare state dict, as medvlsm's convert_cris_model.py writes one)"}


@dataclass
class CrisCheckpoint:
    """What a CRIS checkpoint file gives: its state dict (prefix dropped), the prefix, the
    threshold its Lightning hyper-parameters name (None when none) and the names the
    tensors-only reader put placeholders in for (dropped, never imported or run)."""

    state: dict
    wrapper: str = ""
    threshold: float | None = None
    skipped: list = field(default_factory=list)

    @property
    def text_padding(self) -> str:
        return PADDING_OF_WRAPPER[self.wrapper]


# ---------------------------------------------------------------- the tensors-only reader

class _Inert:
    """Stands for a class or function a pickle names that the reader does not rebuild: it is
    never imported; calling it, building it or filling it runs only this code, which keeps what
    it was given (so a Lightning checkpoint's threshold can be read) and does nothing else."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "_items", {})
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_state", state)

    def __setitem__(self, key, value):
        self._items[key] = value

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __call__(self, *args, **kwargs):
        return type(self)()

    def __repr__(self):
        return f"<not loaded: {self._name}>"


class _StorageKind:
    """A ``torch.<Type>Storage`` name in a pickle: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """One storage record of the archive: its bytes and the dtype its tensors read them as."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped, self.dtype = untyped, dtype
        self.numel = untyped.nbytes() // torch.empty(0, dtype=dtype).element_size()


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
                   "ComplexDoubleStorage": torch.complex128}


def _ints(values, what: str) -> tuple:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(type(v) is int and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of whole numbers")
    return tuple(values)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 for plain tensors, its arguments checked; hooks and
    gradients are not weights and are dropped."""
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("a tensor is not built from a storage of this file")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or metadata:
        raise pickle.UnpicklingError("a tensor's layout is not a plain tensor's")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > storage.numel:
        raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter holds no tensor")
    return data


_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("collections", "OrderedDict"): OrderedDict, ("collections", "Counter"): Counter,
            ("builtins", "set"): set, ("builtins", "frozenset"): frozenset}


class _TensorsOnly(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict = {}
        self.inert: dict = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, str(name), None), torch.dtype):
            return getattr(torch, name)  # a dtype is a constant
        full = f"{module}.{name}"
        if full not in self.inert:  # a new class, never the real one: nothing is imported
            self.inert[full] = type(f"NotLoaded[{full}]", (_Inert,), {"_name": full})
        return self.inert[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageKind)):
            raise pickle.UnpicklingError("a storage reference of an unknown kind")
        _, kind, key, _location, numel = pid
        if str(key) not in self.storages:
            try:
                data = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"the storage data/{key} is missing from the archive") from None
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if type(numel) is not int or len(data) != numel * itemsize:
                raise pickle.UnpicklingError(f"the storage data/{key} has {len(data)} bytes, not {numel} items")
            untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
            self.storages[str(key)] = _Storage(untyped, kind.dtype)
        storage = self.storages[str(key)]
        if storage.dtype != kind.dtype:
            raise pickle.UnpicklingError("one storage is read as two dtypes")
        return storage


def read_tensors_only(path) -> tuple[object, list[str]]:
    """The object in a zip-format ``torch.save`` file (any pickle protocol), with tensors
    rebuilt and every other class or function it names replaced by an inert placeholder (see
    ``_Inert``); and the names so replaced. Nothing in the file is imported or run."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ModelNotFoundError(f"{path} is not a torch.save archive (no single data.pkl).")
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "constants.pkl" in names:
            raise ModelNotFoundError(f"{path} is a TorchScript archive, not a torch.save of weights.")
        order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if order != sys.byteorder:
            raise ModelNotFoundError(f"{path} was written on a {order}-endian machine; this one is {sys.byteorder}.")
        unpickler = _TensorsOnly(archive.read(pickles[0]), archive, prefix)
        obj = unpickler.load()
    return obj, sorted(unpickler.inert)


def _inert_in(obj, depth: int = 0) -> str | None:
    """The name of a placeholder anywhere in ``obj`` (containers searched), else None."""
    if isinstance(obj, _Inert):
        return obj._name
    if depth > 50:
        return None
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set, frozenset)) else ()
    keys = obj.keys() if isinstance(obj, dict) else ()
    for v in [*keys, *values]:
        found = _inert_in(v, depth + 1)
        if found:
            return found
    return None


def _lightning_threshold(obj) -> float | None:
    """The ``threshold`` of a Lightning checkpoint's hyper-parameters (medvlsm's BaseModule
    saves its threshold there), whether they came back as a dict or a placeholder."""
    if not isinstance(obj, dict):
        return None
    hp = obj.get("hyper_parameters")
    items = hp if isinstance(hp, dict) else getattr(hp, "_items", {}) if isinstance(hp, _Inert) else {}
    value = items.get("threshold")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1 \
        else None


def _unsafe(path, why: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"{path} is not a plain weights file ({why}), so it was not loaded and nothing in it ran: unpickling "
        "it could run arbitrary code. A CRIS checkpoint holds only tensors and numbers; get the file again "
        "from its release page, or, only if you trust where it came from, re-save its weights alone on "
        "another machine (torch.save(torch.load(CKPT, weights_only=False)['state_dict'], 'cris_weights.pth')) "
        "and convert that.")


def _torch_reason(exc: Exception) -> str:
    """The line of torch's refusal that says why (its "Unsupported global: GLOBAL ..." or
    "Trying to load unsupported GLOBAL ... whose module ... is blocked"), not its advice or link."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for needle in ("global", "unsupported", "weightsunpickler error"):
        hit = next((ln for ln in lines if needle in ln.lower() and "documentation" not in ln.lower()), None)
        if hit:
            return hit.removeprefix("WeightsUnpickler error:").strip()[:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def read_checkpoint(path) -> CrisCheckpoint:
    """The CRIS state dict of a checkpoint (``{"state_dict": ...}`` or a bare state dict, its
    keys with or without ``module.`` / ``net.``), under the names of ``CrisForImageSegmentation``,
    with what the file says about how it was trained."""
    path = Path(path)
    obj, skipped = None, []
    try:
        with warnings.catch_warnings():  # a TorchScript archive is refused below; torch's notes are noise
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            warnings.filterwarnings("ignore", message=".*Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # an opcode or an object torch's safe reader does not take
        if not zipfile.is_zipfile(path):
            why = _torch_reason(exc)
            if "unsupported operand" in why.lower():  # a newer pickle protocol, not an object
                raise ModelNotFoundError(
                    f"{path} is in torch's old (non-zip) format with a pickle protocol that torch's safe reader "
                    f"does not take ({why}), so it was not loaded and nothing in it ran. Where you trust the "
                    "file, load it and save its state dict again with torch.save (the current zip format, which "
                    "is read here whatever its protocol), then convert that.") from None
            raise _unsafe(path, why) from None
        try:
            obj, skipped = read_tensors_only(path)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RecursionError) as inner:
            raise _unsafe(path, f"{type(inner).__name__}: {inner}"[:200]) from None
        except (zipfile.BadZipFile, OSError) as inner:
            raise ModelNotFoundError(f"{path} cannot be read as a CRIS checkpoint ({inner}).") from None
    except Exception as exc:  # not a torch file, a TorchScript archive (CLIP's RN50.pt), a cut-off download
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelNotFoundError(f"{path} cannot be read as a CRIS checkpoint ({why}). Give CRIS.pytorch's "
                                 "best_model.pth, medvlsm's cris_best_single.pth or a checkpoint of its CRIS "
                                 "finetuning, not CLIP's RN50.pt.") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    inert = _inert_in(state)
    if inert:
        raise _unsafe(path, f"its weights hold {inert}, which is not a tensor")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelNotFoundError(f"{path} holds no state dict of tensors; it is not a CRIS checkpoint.")
    wrapper = ""
    for prefix in WRAPPER_PREFIXES:
        if all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            wrapper = wrapper or prefix  # the outer one names the trainer (a DataParallel inside Lightning: net.)
    return CrisCheckpoint(dict(state), wrapper, _lightning_threshold(obj), skipped)


def read_release_checkpoint(path) -> dict[str, torch.Tensor]:
    """The CRIS state dict of a checkpoint (``read_checkpoint``), alone."""
    return read_checkpoint(path).state


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


def backend_from_checkpoint(path, device="cpu", text_padding: str | None = None, **overrides):
    """A CrisBackend (fp32) from a checkpoint, with the CLIP tokenizer, reading prompts the
    way its weights were trained (``text_padding``: None for what the file tells, see
    ``PADDING_OF_WRAPPER``). The checkpoint read is kept as ``backend.checkpoint``."""
    from napari_vlsm.core.models.cris.model import CrisBackend
    from napari_vlsm.core.models.processors import load_tokenizer

    checkpoint = read_checkpoint(path)
    module = module_from_state(checkpoint.state, path, text_padding=text_padding or checkpoint.text_padding,
                               **overrides)
    backend = CrisBackend(module, load_tokenizer(), torch.device(device), torch.float32, str(path))
    backend.checkpoint = checkpoint
    return backend


def convert_cris_checkpoint(path, out_folder, text_padding: str | None = None, threshold: float | None = None,
                            **overrides) -> Path:
    """Write a CRIS model folder (config.json, model.safetensors, tokenizer, vlsm_card.json) to
    ``out_folder``: it must be new or empty; it appears only when complete. The config records
    the text padding the weights were trained with (``text_padding`` overrides what the file
    tells); the card the threshold to use (``threshold``, else a Lightning checkpoint's own,
    else the benchmark's 0.35)."""
    from napari_vlsm.core.atomic import atomic_write_text
    from napari_vlsm.core.models.cris.model import BENCHMARK_THRESHOLD
    from napari_vlsm.core.models.model_card import CARD_FILE

    out = Path(out_folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelNotFoundError(f"{out} is not empty; choose a new folder for the converted model.")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability between 0 and 1, not {threshold}.")
    backend = backend_from_checkpoint(path, text_padding=text_padding, **overrides)
    ckpt = backend.checkpoint
    chosen = threshold if threshold is not None else ckpt.threshold if ckpt.threshold is not None \
        else BENCHMARK_THRESHOLD
    card = {"title": f"CRIS (CLIP RN50) converted from {Path(path).name}", "threshold": chosen,
            "converted_from": {"file": Path(path).name, "trained_by": TRAINED_BY[ckpt.wrapper],
                               "text_padding": backend.module.config.text_padding,
                               "text_padding_from": "text_padding=" if text_padding else "the file's keys",
                               "threshold_from": "threshold=" if threshold is not None else
                               "the checkpoint's hyper_parameters" if ckpt.threshold is not None else
                               "the benchmark's configs/model/cris.yaml",
                               "not_loaded": ckpt.skipped}}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    try:
        backend.save(tmp)
        atomic_write_text(tmp / CARD_FILE, json.dumps(card, indent=1))
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
    from napari_vlsm.core.models.clipseg import merged_state_dict

    module = getattr(backend_or_module, "module", backend_or_module)
    state = {prefix + k: v.cpu() for k, v in merged_state_dict(module).items()}
    torch.save({"epoch": 50, "cur_iou": 0.0, "best_iou": 0.0, "prec": {"Pr@50": 0.0},
                "state_dict": state, "scheduler": {"milestones": Counter({35: 1}), "gamma": 0.1, "last_epoch": 50}},
               Path(path))
    return Path(path)

