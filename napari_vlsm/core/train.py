"""Finetuning as a generator of progress events.

``train(...)`` yields a ``Progress`` after every step and epoch, so a GUI worker or the
command line shows progress and can stop between steps (close the generator, or set
``stop``). The best model so far (by validation Dice; by training loss when there is no
validation set) is kept in ``out_dir/best`` and the latest in ``out_dir/last``, both
written atomically; stopping, a crash or a NaN loss leaves them as they were.

Default recipe, after the benchmark: Dice + BCE loss, AdamW (weight decay 1e-3),
ReduceLROnPlateau on validation Dice, gradient clipping, early stopping, bf16/fp16
autocast on GPU.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .backend import TorchBackend
from .checkpoint import check_writable, read_metadata, save_checkpoint
from .data import TRAIN_PROMPT_TYPES, Example, PairCache, augment
from .errors import TrainingError

DEFAULT_LR = {"decoder": 1e-3, "full": 1e-4, "lora": 3e-4}


@dataclass
class TrainSettings:
    mode: str = "decoder"          # decoder | full | lora
    epochs: int = 20
    lr: float | None = None        # None: DEFAULT_LR[mode]
    batch_size: int = 8
    weight_decay: float = 1e-3
    val_fraction: float = 0.2
    patience: int = 5              # epochs without validation gain before stopping
    grad_clip: float = 1.0
    augment: bool = True
    crop: int | None = None        # train on random crops of this side (fully convolutional models)
    schedule: str = "plateau"      # plateau | onecycle
    prompt_types: tuple = TRAIN_PROMPT_TYPES
    val_prompt_type: str = "p1"
    negative_prompts: list = field(default_factory=list)  # prompts for absent things -> empty target
    negative_fraction: float = 0.25
    seed: int = 0
    threads: int | None = None

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


@dataclass
class Progress:
    kind: str                 # "step" | "epoch" | "done" | "stopped"
    epoch: int
    epochs: int
    step: int
    steps: int                # total steps of the run
    loss: float
    val_dice: float | None = None
    best_dice: float | None = None
    elapsed: float = 0.0
    eta: float | None = None
    images_per_s: float | None = None
    checkpoint: str | None = None
    message: str = ""


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of BCE and soft Dice loss (smooth 1, so an empty target asks for an empty mask)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def check_examples(train_set: list[Example], val_set: list[Example]) -> None:
    if not train_set:
        raise TrainingError("The training set is empty; add at least one image with its corrected mask.")
    for ex in train_set[:1] + val_set[:1]:
        try:
            ex.load()
        except (OSError, ValueError) as exc:
            raise TrainingError(f"Cannot use the training data: {exc}") from exc


def _batches(n: int, batch_size: int, seed: int, world: int = 1, rank: int = 0):
    """This rank's batches of one epoch. Every rank shuffles alike and gets as many batches."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if world > 1:
        order = order[: len(order) - len(order) % world] or order[:1] * world
    order = order[rank::world]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _make_batch(cache: PairCache, examples, idx, settings, rng, np_rng, backend):
    images, masks, prompts = [], [], []
    for i in idx:
        im, mk = cache[i]
        if settings.augment:
            im, mk = augment(im, mk, np_rng)
        images.append(im)
        masks.append(mk)
        prompts.append(examples[i].prompt(settings.prompt_types, rng))
    pixels = backend.preprocess(images)
    target = torch.from_numpy(np.stack(masks)).float().to(backend.device)
    c = settings.crop
    if c and c < min(target.shape[-2:]):  # one random window for the whole batch
        y, x = (int(np_rng.integers(0, n - c + 1)) for n in target.shape[-2:])
        pixels, target = pixels[..., y:y + c, x:x + c], target[..., y:y + c, x:x + c]
    return pixels, target, prompts


def _loss(backend: TorchBackend, pixels, target, prompts, settings, rng) -> torch.Tensor:
    feats = backend.encode_image(pixels)
    text = backend.encode_text(prompts)
    n_neg = int(round(len(prompts) * settings.negative_fraction)) if settings.negative_prompts else 0
    if n_neg:
        # Negatives go through the decoder in the same pass as the positives, so batch-norm
        # statistics see the same mixture in training as the running statistics hold later.
        neg = backend.encode_text([rng.choice(settings.negative_prompts) for _ in range(n_neg)])
        feats = [torch.cat([f, f[:n_neg]]) for f in feats]
        text = torch.cat([text, neg])
        target = torch.cat([target, torch.zeros_like(target[:n_neg])])
    logits = backend.decode(feats, text)
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    n = len(prompts)
    loss = dice_bce_loss(logits[:n], target[:n])
    if n_neg:
        loss = loss + settings.negative_fraction * dice_bce_loss(logits[n:], target[n:])
    return loss


@torch.no_grad()
def validate(backend: TorchBackend, cache: PairCache, examples, prompt_type: str, batch_size: int = 8) -> float:
    """Mean Dice at the model's input size, threshold 0.5, one fixed prompt per image."""
    from .metrics import dice

    backend.module.eval()
    rng = random.Random(0)
    scores = []
    for start in range(0, len(cache), batch_size):
        idx = range(start, min(start + batch_size, len(cache)))
        images = [cache[i][0] for i in idx]
        prompts = [examples[i].prompt((prompt_type,), rng) for i in idx]
        logits = backend.decode(backend.encode_image(backend.preprocess(images)), backend.encode_text(prompts))
        for j, i in enumerate(idx):
            pred = logits[j].float()
            truth = cache[i][1]
            if pred.shape != truth.shape:
                pred = F.interpolate(pred[None, None], size=truth.shape, mode="bilinear")[0, 0]
            scores.append(dice(pred.cpu().numpy() > 0, truth))
    return float(np.mean(scores)) if scores else float("nan")


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _from_rank0(*values):
    import torch.distributed as dist

    t = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64)
    dist.broadcast(t, 0)
    return tuple(None if math.isnan(v) else v for v in t.tolist())


def _all_reduce_grads(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def train(backend: TorchBackend, train_set: list[Example], val_set: list[Example], out_dir,
          settings: TrainSettings | None = None, resume: bool = False, metadata: dict | None = None,
          stop: threading.Event | None = None) -> Iterator[Progress]:
    """Finetune ``backend`` in place; yield progress; keep checkpoints in ``out_dir``."""
    s = settings or TrainSettings()
    check_examples(train_set, val_set)
    out = check_writable(out_dir)
    world, rank = _distributed()
    if s.threads:
        torch.set_num_threads(s.threads)
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    rng, np_rng = random.Random(s.seed + rank), np.random.default_rng(s.seed + rank)

    start_epoch, history = 0, []
    if resume and (out / "last").exists():
        done = read_metadata(out / "last")
        start_epoch, history = done.get("epochs_done", 0), done.get("history", [])
    params = backend.trainable_parameters(s.mode)
    backend.module.float()
    backend.dtype = torch.float32
    if world > 1:  # every rank starts from rank 0's weights
        import torch.distributed as dist

        for t in backend.module.state_dict().values():
            dist.broadcast(t, 0)
    opt = torch.optim.AdamW(params, lr=s.learning_rate(), weight_decay=s.weight_decay)
    size = backend.input_size
    train_cache, val_cache = PairCache(train_set, size), PairCache(val_set, size)
    steps_per_epoch = len(_batches(len(train_set), s.batch_size, s.seed, world, rank))
    total = steps_per_epoch * s.epochs
    if s.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.learning_rate(), total_steps=max(total, 1))
        for _ in range(start_epoch * steps_per_epoch):
            sched.step()
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
    use_amp = backend.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    best = max((h["val_dice"] for h in history if h.get("val_dice") is not None), default=-1.0)
    best_loss = min((h["loss"] for h in history), default=math.inf)
    stale, step, t0, seen = 0, start_epoch * steps_per_epoch, time.time(), 0
    meta = {"base_model": backend.source, "settings": asdict(s), "train_examples": len(train_set),
            "val_examples": len(val_set), "world_size": world, "history": history, **(metadata or {})}

    for epoch in range(start_epoch, s.epochs):
        train_mode(backend.module)
        losses = []
        for idx in _batches(len(train_set), s.batch_size, s.seed * 7919 + epoch, world, rank):
            if stop is not None and stop.is_set():
                yield Progress("stopped", epoch, s.epochs, step, total, float("nan"), best_dice=best,
                               elapsed=time.time() - t0, message=_stopped_message(out))
                return
            pixels, target, prompts = _make_batch(train_cache, train_set, idx, s, rng, np_rng, backend)
            with torch.autocast(backend.device.type, dtype=amp_dtype, enabled=use_amp):
                loss = _loss(backend, pixels, target, prompts, s, rng)
            if not torch.isfinite(loss):
                raise TrainingError(f"The loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                    f"training stopped. {_stopped_message(out)} Try a lower learning rate.")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world > 1:
                _all_reduce_grads(params, world)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            scaler.step(opt)
            scaler.update()
            if s.schedule == "onecycle":
                sched.step()
            step += 1
            seen += len(idx)
            losses.append(loss.item())
            elapsed = time.time() - t0
            rate = elapsed / max(step - start_epoch * steps_per_epoch, 1)
            yield Progress("step", epoch, s.epochs, step, total, losses[-1], best_dice=best, elapsed=elapsed,
                           eta=rate * (total - step), images_per_s=seen * world / max(elapsed, 1e-9))
        epoch_loss = float(np.mean(losses)) if losses else float("nan")
        val = validate(backend, val_cache, val_set, s.val_prompt_type, s.batch_size) if val_set else None
        if world > 1:  # decisions (best, schedule, early stop) follow rank 0
            val, epoch_loss = _from_rank0(val, epoch_loss)
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "val_dice": val,
                        "lr": opt.param_groups[0]["lr"], "elapsed": time.time() - t0})
        improved = (val is not None and val > best) or (val is None and epoch_loss < best_loss)
        if improved:
            best, best_loss, stale = (val if val is not None else best), min(best_loss, epoch_loss), 0
        else:
            stale += 1
        meta.update(epochs_done=epoch + 1, history=history, best_val_dice=best if best >= 0 else None)
        ckpt = None
        if rank == 0:
            save_checkpoint(backend, out / "last", meta)
            if improved:
                ckpt = str(save_checkpoint(backend, out / "best", meta))
        if s.schedule != "onecycle" and val is not None:
            sched.step(val)
        elapsed = time.time() - t0
        yield Progress("epoch", epoch + 1, s.epochs, step, total, epoch_loss, val, best if best >= 0 else None,
                       elapsed, elapsed / max(epoch + 1 - start_epoch, 1) * (s.epochs - epoch - 1),
                       seen * world / max(elapsed, 1e-9), ckpt)
        if val_set and stale >= s.patience:
            yield Progress("done", epoch + 1, s.epochs, step, total, epoch_loss, val, best, elapsed,
                           checkpoint=str(out / "best"),
                           message=f"Stopped early: no validation gain for {s.patience} epochs.")
            return
    yield Progress("done", s.epochs, s.epochs, step, total, history[-1]["loss"] if history else float("nan"),
                   history[-1]["val_dice"] if history else None, best if best >= 0 else None,
                   time.time() - t0, checkpoint=str(out / "best"), message="Training finished.")


def train_mode(module: torch.nn.Module) -> None:
    """Training mode, except batch norms whose weights are frozen: their running statistics
    stay as they are, so a part that is not trained does not drift either."""
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _stopped_message(out: Path) -> str:
    if (out / "best").exists():
        return f"The last good checkpoint is intact at {out / 'best'}."
    return "No checkpoint had been written yet."


def init_distributed() -> bool:
    """Join a torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def training_data(data_dirs, val_split: str = "val", val_fraction: float = 0.2, prompt: str | None = None,
                  seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Pool several folders. A folder's anns/<val_split>.json is its validation set where it
    exists; otherwise ``val_fraction`` of its examples are held out."""
    from .data import benchmark_examples, load_examples, split_examples

    train_set, val_set = [], []
    for d in map(Path, data_dirs):
        examples = load_examples(d, "train", prompt)
        if (d / "anns" / f"{val_split}.json").exists() and val_split != "train":
            train_set += examples
            val_set += benchmark_examples(d, val_split)
        else:
            tr, va = split_examples(examples, val_fraction, seed)
            train_set += tr
            val_set += va
    return train_set, val_set


def load_for_training(spec: str, device="auto") -> TorchBackend:
    """The model to finetune, in fp32: a spec for load_model, or 'new:film-unet'."""
    if spec == "new:film-unet":
        from .registry import new_film_unet

        return new_film_unet(device)
    from .loading import load_model

    backend = load_model(spec, device=device, dtype="fp32")
    if not isinstance(backend, TorchBackend):
        raise TrainingError(f"{spec} cannot be finetuned (an ONNX export); finetune its PyTorch folder instead.")
    return backend


def finetune(spec: str, data_dirs, out_dir, settings: TrainSettings | None = None, resume: bool = False,
             prompt: str | None = None, val_split: str = "val", device="auto", metadata: dict | None = None,
             stop: threading.Event | None = None) -> Iterator[Progress]:
    """Load data and model, then ``train``: the whole job behind the CLI and the widget."""
    s = settings or TrainSettings()
    try:
        train_set, val_set = training_data(data_dirs, val_split, s.val_fraction, prompt, s.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise TrainingError(str(exc)) from exc
    last = Path(out_dir) / "last"
    backend = load_for_training(str(last) if resume and (last / "config.json").exists() else spec, device)
    meta = {"data": [str(d) for d in data_dirs], "prompt": prompt, **(metadata or {})}
    yield from train(backend, train_set, val_set, out_dir, s, resume=resume, metadata=meta, stop=stop)
