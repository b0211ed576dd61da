"""Finetuning as a generator of progress events.

``train(...)`` yields a ``Progress`` after every step and epoch, so a GUI worker or the
command line shows progress and can stop between steps (close the generator, or set
``stop``). The best model so far (by validation Dice; by training loss when there is no
validation set) is kept in ``out_dir/best`` and the latest in ``out_dir/last``, both
written atomically; stopping, a crash or a NaN loss leaves them as they were.

One recipe for the command line and the widget, made for rounds of corrections
(``TrainSettings()`` defaults, docs/corrections.md): the model's own training mode (full for
the FiLM-UNet, decoder for CLIPSeg) with the first levels of a pretrained image encoder left
as they are, ``ROUND_STEPS`` optimiser steps for up to ``ROUND_SIZE`` (87) corrections and more
for a larger set (``TrainSettings.round_steps``), a one-cycle schedule, a moving average of the
weights kept, every correction used for training while there are fewer than ``SMALL_SET`` of
them, and the model's replay sample (see ``replay.py``) in each batch so that it keeps what it
knew. A round that goes on from a model trained on part of the set (the training.json of
the model it starts from names what that was) draws the corrections new to it half of the
time. Dice + BCE loss, AdamW (weight decay 1e-3), gradient clipping, bf16/fp16 autocast on
GPU. Larger runs set epochs, validation share and schedule themselves.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_vlsm.core.training.adapters import AdapterView, adapter_parameters, plan_adapter, prepare_adapter
from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.training.click_simulation import guided_rows, simulate_guidance
from napari_vlsm.core.training.checkpoint import (BEST, LAST, check_writable, copy_checkpoint, read_metadata,
                                                  recover_checkpoints, save_checkpoint, unsound)
from napari_vlsm.core.data.concepts import NegativePrompts, absent_concepts, add_synonyms
from napari_vlsm.core.device import cpu_threads
from napari_vlsm.core.errors import TrainingError
from napari_vlsm.core.file_names import CONFIG
from napari_vlsm.core.models.model_card import CARD_FILE, card_after_finetune, read_card
from napari_vlsm.core.models.loading import local_folder
from napari_vlsm.core.models.train_modes import AUTO_MODE, TRAIN_MODES
from napari_vlsm.core.inference.predictor import decode_views, encode_views
from napari_vlsm.core.data.prompts import SYNONYM_TYPE
from napari_vlsm.core.data.replay import REPLAY_DIR, replay_dir, replay_examples
from napari_vlsm.core.data.training_sets import Example, PairCache, augment
from napari_vlsm.core.training.settings import SMALL_SET, TRAIN_MODES_OFFERED, TrainSettings  # noqa: F401
from napari_vlsm.core.training.weight_average import WeightAverage

NO_SYNC = os.environ.get("NAPARI_VLSM_NO_GRAD_SYNC") == "1"  # diagnostic: ranks drift apart (tests show it)
CHECKPOINT_EVERY_S = 60  # a round of corrections saves at its end; a longer run also every this often


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
    val_by_set: dict | None = None   # data set -> val Dice, at epoch ends of pooled training
    timings: dict | None = None      # phase -> seconds, at the end of a run (Clock)


class Clock(dict):
    """Seconds a run spends in each phase (loading, reading images, making batches, the
    optimiser steps, validation, checkpoints): where the time of a round goes."""

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of BCE and soft Dice loss (smooth 1, so an empty target asks for an empty mask)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def check_mode(backend: TorchBackend, mode: str) -> str:
    """The training mode to run ('auto': the model's own), refused with the family's modes
    when the family has no such mode."""
    from napari_vlsm.core.models.families import family_of_backend

    if mode == AUTO_MODE:
        return backend.default_train_mode
    family = family_of_backend(backend)
    modes = family.train_modes if family else TRAIN_MODES
    if mode not in modes:
        raise TrainingError(f"{backend.name} cannot be trained in mode {mode!r}; its modes are {', '.join(modes)}.")
    return mode


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


def _prompt_types(settings: TrainSettings) -> tuple:
    return tuple(settings.prompt_types) + ((SYNONYM_TYPE,) if settings.synonyms else ())


def trained_prompts(examples, prompt_types, negatives=()) -> list[str]:
    """Every prompt string a training run can draw: the examples' prompts of the types
    trained (lists included) and the negatives."""
    out = list(negatives)
    for ex in examples:
        for t in prompt_types:
            value = ex.prompts.get(t)
            out += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return out


def _make_batch(cache: PairCache, examples, idx, settings, rng, np_rng, backend):
    images, masks, prompts = [], [], []
    for i in idx:
        im, mk = cache[i]
        if settings.augment:
            im, mk = augment(im, mk, np_rng)
        images.append(im)
        masks.append(mk)
        prompts.append(examples[i].prompt(_prompt_types(settings), rng))
    pixels = backend.preprocess(images)
    target = torch.from_numpy(np.stack(masks)).float().to(backend.device)
    c = settings.crop if settings.crop is not None else backend.default_crop
    if c and c < min(target.shape[-2:]):  # one random window for the whole batch
        y, x = (int(np_rng.integers(0, n - c + 1)) for n in target.shape[-2:])
        pixels, target = pixels[..., y:y + c, x:x + c], target[..., y:y + c, x:x + c]
    return pixels, target, prompts


def _ask_own_class_where_absent(target, prompts, batch, negatives, rng, share: float = 0.5) -> None:
    """Half of the images (or crops) without the object are asked for their own class
    instead of their own prompt: a normal breast-ultrasound image carries "No tumor in the
    breast ultrasound image.", but a person asks it for the tumour, and nothing is the answer."""
    for j, ex in enumerate(batch):
        if not target[j].any() and rng.random() < share:
            prompts[j] = negatives.own(ex, rng) or prompts[j]


def _loss(backend: TorchBackend, pixels, target, prompts, settings, rng, negatives=None, batch=()) -> torch.Tensor:
    """Dice+BCE on the batch, plus the same on its first images decoded again with prompts
    for absent things (drawn by ``negatives`` for the examples ``batch``) against empty masks."""
    n_neg = min(int(round(len(prompts) * settings.negative_fraction)), len(batch)) if negatives else 0
    if settings.guidance_share and backend.takes_clicks:  # clicks and boxes, as an annotator gives them
        rows = guided_rows(target, n_neg, settings.guidance_share, rng)
        guidance = simulate_guidance(backend, pixels, target, prompts, rows, rng, settings.click_iterations)
        feats = backend.encode_image(pixels, guidance)
    else:
        feats = backend.encode_image(pixels)
    text = backend.encode_text(prompts)
    if n_neg:
        # Negatives go through the decoder in the same pass as the positives, so batch-norm
        # statistics see the same mixture in training as the running statistics hold later.
        neg = backend.encode_text([negatives.draw(ex, rng) for ex in batch[:n_neg]])
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


@dataclass
class Validation:
    dice: float                        # mean over the data sets of each set's mean Dice
    by_set: dict                       # data set (folder name) -> mean Dice
    cross_prompt_rate: float | None    # share of images where another concept's p1 gives a mask over 1%


@torch.no_grad()
def validate(backend: TorchBackend, cache: PairCache, examples, prompt_type: str, batch_size: int = 8,
             concepts: dict | None = None) -> Validation:
    """Dice at the model's input size, threshold 0.5, one fixed prompt per image, per data set,
    from the image and its mirror when the model is set to answer so (``flip_average``).
    Images without the object are asked for their set's class (``concepts``: group -> concept,
    from the training set), and each image is also asked for
    another concept, which should find nothing there."""
    from napari_vlsm.core.images.metrics import dice

    backend.module.eval()
    rng = random.Random(0)
    scores, crossed = defaultdict(list), []
    finite = True  # logits that are NaN or infinite give a NaN Dice, not the 0 their empty masks would score
    for start in range(0, len(cache), batch_size):
        idx = list(range(start, min(start + batch_size, len(cache))))
        images = [cache[i][0] for i in idx]
        prompts = [_val_prompt(examples[i], cache[i][1].any(), prompt_type, concepts, rng) for i in idx]
        cross = []
        for j, i in enumerate(idx):
            others = absent_concepts(concepts, examples[i].kind) if examples[i].kind in (concepts or {}) else []
            if others:
                cross.append((j, others[i % len(others)]))
        views = encode_views(backend, backend.preprocess(images), backend.flip_average)  # as the predictor
        text = backend.encode_text(prompts + [c for _, c in cross])
        if cross:
            views = [[torch.cat([f, f[[j for j, _ in cross]]]) for f in feats] for feats in views]
        logits = decode_views(backend, views, text).float()
        finite = finite and bool(torch.isfinite(logits).all())
        for j, i in enumerate(idx):
            truth = cache[i][1]
            pred = _at(logits[j], truth.shape)
            scores[examples[i].kind].append(dice(pred > 0, truth))
        for k, (j, _) in enumerate(cross):
            crossed.append(float((_at(logits[len(idx) + k], cache[idx[j]][1].shape) > 0).mean() > 0.01))
    by_set = {g: float(np.mean(v)) if finite else float("nan") for g, v in sorted(scores.items())}
    return Validation(float(np.mean(list(by_set.values()))) if by_set else float("nan"), by_set,
                      float(np.mean(crossed)) if crossed else None)


def _val_prompt(ex: Example, has_object: bool, prompt_type: str, concepts: dict | None, rng) -> str:
    """An image without the object is asked for its set's class, as a person would ask it
    ("No tumor in the breast ultrasound image." is its own p1); the others, their own prompt."""
    concept = (concepts or {}).get(ex.kind)
    return concept if concept and not has_object else ex.prompt((prompt_type,), rng)


def _at(logits: torch.Tensor, shape) -> np.ndarray:
    if tuple(logits.shape) != tuple(shape):
        logits = F.interpolate(logits[None, None], size=tuple(shape), mode="bilinear")[0, 0]
    return logits.cpu().numpy()


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _from_rank0(*values, device=None):
    import torch.distributed as dist

    # NCCL moves only CUDA tensors; gloo takes CPU ones
    t = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return tuple(None if math.isnan(v) else v for v in t.tolist())


def _gather_weight_sums(backend) -> list[float]:
    import torch.distributed as dist

    mine = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in backend.module.parameters())],
                        dtype=torch.float64, device=backend.device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [float(t.item()) for t in every]


def _all_reduce_grads(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def train(backend: TorchBackend, train_set: list[Example], val_set: list[Example], out_dir,
          settings: TrainSettings | None = None, resume: bool = False, metadata: dict | None = None,
          stop: threading.Event | None = None, replay: Path | None = None,
          card: dict | None = None, clock: Clock | None = None, before: dict | None = None) -> Iterator[Progress]:
    """Finetune ``backend`` in place; yield progress; keep checkpoints in ``out_dir``.

    ``replay``: a replay folder (see ``replay.py``) mixed into every batch and copied into
    each checkpoint; ``card``: the base model's card (``model_card.py``), kept with the
    prompts trained here added. With ``resume``, training goes on from ``out_dir/last``: the same
    schedule when the training set is unchanged, a new round of it when examples were added.
    ``clock`` collects the seconds of each phase (a caller's, to add its own loading to);
    ``before``: the starting model's training.json, which says what it was trained on.
    """
    clock = Clock() if clock is None else clock
    with clock("set-up"):
        plan = plan_run(backend, train_set, val_set, out_dir, settings, resume, replay, card, before)
        _start_from_rank0(backend, plan.world)
        optim = make_optimisation(backend, plan)
    with clock("reading images"):
        train_cache, val_cache = PairCache(plan.pool, backend.input_size), PairCache(plan.val_set, backend.input_size)
        train_cache.load_all()
    run = RunState.start(plan, clock)
    checkpoints = _checkpoints(backend, plan, metadata, replay, card, clock)
    summary = _run_summary(plan, train_cache)

    for epoch in range(plan.start_epoch, plan.epochs):
        train_mode(backend.module, plan.settings.keep_norm_stats)
        losses = []
        for batch in plan.batches(epoch):
            if stop is not None and stop.is_set():
                yield _stopped(plan, run, epoch)
                return
            losses.append(_train_step(backend, plan, optim, train_cache, batch, epoch, run.step, clock))
            run.step += 1
            run.seen += len(batch) + plan.n_replay
            yield _step_progress(plan, run, epoch, losses[-1])
        progress, stopping = _end_epoch(backend, plan, optim, run, checkpoints, val_cache, epoch, losses)
        yield progress
        if stopping:
            yield _stopped_early(plan, run, progress, summary)
            return
    yield _finish(plan, run, checkpoints, summary)


@dataclass
class RunPlan:
    """What a run will do, settled before its first step. Batches hold ``n_new`` corrections
    (indices into ``train_set``) and ``n_replay`` replay pairs (indices past it, into ``pool``)."""
    settings: TrainSettings        # mode, replay share and learning rate resolved
    train_set: list[Example]       # with synonyms and repeats
    replay_set: list[Example]
    pool: list[Example]            # train_set + replay_set: what a batch index points at
    val_set: list[Example]
    n_distinct: int                # training examples before repeats
    n_repeated: int                # with repeats (--repeat), before the new ones are weighed up
    n_fresh: int | None            # a round that goes on: examples new to the model it starts from
    trained_names: list[str]       # "folder/image" keys of the training examples, sorted
    negatives: NegativePrompts
    out: Path
    world: int                     # ranks of a distributed run, and this one's
    rank: int
    rng: random.Random             # this rank's draws (batches, prompts, negatives)
    np_rng: np.random.Generator    # this rank's augmentation and crops
    adapter: int | None            # the adapter trained (None: the shared network)
    new_prompts: list[str]         # the adapter's prompts, asked of the replay images
    params: list                   # the weights that learn
    learner: object                # the backend, or the adapter's view of it
    n_new: int
    n_replay: int
    steps_per_epoch: int
    epochs: int
    start_epoch: int               # > 0 when resumed on the same set
    history: list                  # epochs of earlier rounds (and of this one as it goes)
    round_no: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's corrections of each batch of ``epoch``, shuffled anew each epoch and round."""
        seed = self.settings.seed * 7919 + epoch + 1000 * (self.round_no - 1)
        return _batches(len(self.train_set), self.n_new, seed, self.world, self.rank)


def plan_run(backend: TorchBackend, train_set: list[Example], val_set: list[Example], out_dir,
             settings: TrainSettings | None = None, resume: bool = False, replay: Path | None = None,
             card: dict | None = None, before: dict | None = None) -> RunPlan:
    """Check the inputs and settle a run: the sets, the seeded random streams, the adapter (or
    the shared network) and its weights, the batch split, the epochs and where to start.
    Seeds the global RNGs before preparing the adapter, as a run's draws depend on that order."""
    s = settings or TrainSettings()
    s = replace(s, mode=check_mode(backend, s.mode))
    check_examples(train_set, val_set)
    n_distinct = len(train_set)
    train_set = oversample(add_synonyms(train_set, s.synonyms), s.repeat)
    replay_set = replay_examples(replay) if replay else []
    negatives = NegativePrompts(train_set + replay_set if s.cross_negatives else [], _prompt_types(s),
                                s.negative_prompts)
    out = check_writable(out_dir)
    world, rank = _distributed()
    if backend.device.type == "cpu" or s.threads:
        torch.set_num_threads(s.threads or cpu_threads())
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    rng, np_rng = random.Random(s.seed + rank), np.random.default_rng(s.seed + rank)

    backend.module.float()
    backend.dtype = torch.float32
    adapter = plan_adapter(backend, train_set, replay_set, card or {}, s.adapters)
    if adapter:  # a new class on a path of its own; the replay images show where it is absent
        new_prompts = prepare_adapter(backend, adapter, train_set, replay_set, card or {}, s.negative_prompts)
        params, learner = adapter_parameters(backend, adapter), AdapterView(backend, adapter)
    else:
        new_prompts, params, learner = [], backend.trainable_parameters(s.mode), backend
    s = replace(s, frozen_levels=backend.default_frozen_levels if s.frozen_levels is None else s.frozen_levels,
                weight_average=s.average_decay())
    params = _without_frozen_levels(backend, adapter, params, s.frozen_levels)
    known, n_repeated = _known(before, adapter), len(train_set)
    names = sorted({_key(e) for e in train_set})
    n_fresh = len(set(names) - known) if known else None
    train_set = _weigh_new(train_set, known, s.new_share)
    pool = train_set + replay_set
    s = replace(s, replay_fraction=s.replay_share(adapter))
    s = replace(s, lr=s.learning_rate(backend, adapter=bool(adapter)))
    n_replay = min(int(round(s.batch_size * s.replay_fraction)), s.batch_size - 1) if replay_set else 0
    n_new = s.batch_size - n_replay
    steps_per_epoch = len(_batches(len(train_set), n_new, s.seed, world, rank))
    if not s.epochs:
        s = replace(s, steps=s.round_steps(n_distinct, n_new))
    epochs = s.epochs or max(1, round(s.steps / steps_per_epoch))
    start_epoch, history, round_no = _resume_point(out, resume, names, epochs)
    return RunPlan(s, train_set, replay_set, pool, val_set, n_distinct, n_repeated, n_fresh, names, negatives, out,
                   world, rank, rng, np_rng,
                   adapter, new_prompts, params, learner, n_new, n_replay, steps_per_epoch, epochs, start_epoch,
                   history, round_no)


def _known(before: dict | None, adapter: int | None) -> set[str]:
    """The examples the starting model's last round trained the same path on (adapter or
    shared network), by "folder/image" key: what a new round on an enlarged set has seen."""
    if not before or before.get("adapter") != adapter:
        return set()
    return set(before.get("trained_names", []))


def _weigh_new(train_set: list[Example], known: set[str], share: float | None) -> list[Example]:
    """The training list with the examples not in ``known`` repeated so that they make about
    ``share`` of it: a round that continues a trained path spends its steps on what is new
    while the rest keeps being rehearsed."""
    new = [e for e in train_set if _key(e) not in known]
    if not share or not new or len(new) == len(train_set):
        return train_set
    times = max(1, round(share * (len(train_set) - len(new)) / ((1 - share) * len(new))))
    return [e for e in train_set for _ in range(times if _key(e) not in known else 1)]


def _without_frozen_levels(backend: TorchBackend, adapter: int | None, params: list, levels: int) -> list:
    """``params`` less the weights of the first ``levels`` levels of the trained path's image
    encoder, which are frozen: no gradient flows through them, so a step skips their backward."""
    if not levels:
        return params
    from napari_vlsm.core.models.film_unet import FilmUNetForSegmentation, ImagePath

    if not isinstance(backend.module, FilmUNetForSegmentation):
        raise TrainingError(f"Frozen encoder levels are for the FiLM-UNet; {backend.name} trains by its modes.")
    path = backend.module.adapters[adapter - 1] if adapter else backend.module
    frozen = {id(p) for p in ImagePath.encoder_level_parameters(path, levels)}
    for p in params:
        if id(p) in frozen:
            p.requires_grad_(False)
    return [p for p in params if id(p) not in frozen]


def _start_from_rank0(backend: TorchBackend, world: int) -> None:
    """Every rank of a distributed run starts from rank 0's weights."""
    if world > 1:
        import torch.distributed as dist

        for t in backend.module.state_dict().values():
            dist.broadcast(t, 0)


@dataclass
class Optimisation:
    """What changes the weights: the optimiser and what steps along with it."""
    optimiser: torch.optim.Optimizer
    schedule: object                   # OneCycleLR (a step per batch) or ReduceLROnPlateau (per epoch)
    scaler: torch.amp.GradScaler       # fp16 loss scaling (off on the CPU and with bf16)
    use_amp: bool                      # autocast, on CUDA
    amp_dtype: torch.dtype
    average: WeightAverage | None      # the moving average of the weights, validated and saved
    start_weights: list | None         # the starting weights the anchor pulls toward


def make_optimisation(backend: TorchBackend, plan: RunPlan) -> Optimisation:
    """AdamW over the plan's weights (the image encoder at its own rate when set so), the
    weight average and the anchor when set, the schedule fast-forwarded to the resume point,
    and autocast (bf16, else fp16 with loss scaling) on CUDA."""
    s = plan.settings
    optimiser = torch.optim.AdamW(_param_groups(backend, plan.params, s), lr=s.lr, weight_decay=s.weight_decay)
    average = WeightAverage(backend.module, s.weight_average, plan.params) if s.weight_average else None
    start_weights = [p.detach().clone() for p in plan.params] if s.anchor else None
    schedule = _scheduler(optimiser, s.schedule, plan.total, done_steps=plan.start_epoch * plan.steps_per_epoch)
    use_amp = backend.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return Optimisation(optimiser, schedule, scaler, use_amp, amp_dtype, average, start_weights)


@dataclass
class Checkpoints:
    """A run's last/ and best/ and what goes into them: ``meta`` (training.json; the loop
    keeps its history and epoch count up to date) and ``extras`` (the replay sample, the
    model card). Only rank 0 writes."""
    backend: TorchBackend
    out: Path
    rank: int
    meta: dict
    extras: dict
    clock: Clock
    saved_at: float = -math.inf

    def save(self, improved: bool, informative: bool, final: bool = False, best_is_last: bool = False,
             val: float | None = None) -> str | None:
        """last/ (and best/ when improved) after the first epoch, at the end, when validation
        improved, and otherwise every CHECKPOINT_EVERY_S: a short round is not slowed down by
        writing every epoch. ``best_is_last``: the weights are the ones to keep (the schedule's
        end when validation says nothing). best/ is then a copy of last/ that shares its weight
        files, written in a fraction of the time. Weights that are not finite, or answer with
        values that are not (``unsound``; ``val``: the validation Dice), are never saved: the
        run stops with a TrainingError and the checkpoints stay as they were."""
        due = final or time.time() - self.saved_at > CHECKPOINT_EVERY_S
        if self.rank != 0 or not (due or (improved and informative)):
            return None
        self._check_sound(val)
        self.saved_at = time.time()
        with self.clock("checkpoints"):
            save_checkpoint(self.backend, self.out / LAST, self.meta, self.extras)
            return str(copy_checkpoint(self.out / LAST, self.out / BEST)) if improved or best_is_last else None

    def save_best(self) -> str:
        self._check_sound()
        with self.clock("checkpoints"):
            return str(save_checkpoint(self.backend, self.out / BEST, self.meta, self.extras))

    def _check_sound(self, val: float | None = None) -> None:
        why = unsound(self.backend, val)
        if why:
            raise TrainingError(f"After epoch {self.meta.get('epochs_done', '?')} the model {why}; it was not "
                                f"saved and training stopped. {_stopped_message(self.out)} Try a lower learning "
                                "rate.")


def _checkpoints(backend: TorchBackend, plan: RunPlan, metadata: dict | None, replay: Path | None,
                 card: dict | None, clock: Clock) -> Checkpoints:
    """The run's checkpoints with their metadata (settings, sets, validation names, round,
    adapter, history, and the caller's ``metadata``) and extras (the replay folder; the
    card with the prompts trained here added)."""
    s, train_set = plan.settings, plan.train_set
    meta = {"base_model": backend.source, "settings": asdict(s), "train_examples": plan.n_distinct,
            "replay_examples": len(plan.replay_set), "val_examples": len(plan.val_set),
            "val_names": [_key(e) for e in plan.val_set],
            "trained_names": plan.trained_names, "world_size": plan.world, "round": plan.round_no,
            "adapter": plan.adapter, "history": plan.history, **(metadata or {})}
    extras = {REPLAY_DIR: replay} if replay else {}
    if card is not None:
        extras[CARD_FILE] = card_after_finetune(card, [ex.prompts.get("p1", "") for ex in train_set
                                                       if isinstance(ex.prompts.get("p1"), str)],
                                                trained_prompts(train_set, _prompt_types(s), s.negative_prompts))
    return Checkpoints(backend, plan.out, plan.rank, meta, extras, clock)


def _run_summary(plan: RunPlan, train_cache: PairCache) -> str:
    """What the run trains on, for its last message, with a warning (also raised, pointing at
    the caller of train()) when every training mask is empty."""
    summary = _summary(plan.n_distinct, plan.n_repeated, len(plan.replay_set), len(plan.val_set), plan.adapter,
                       plan.n_fresh, plan.settings.new_share)
    if plan.rank == 0 and plan.start_epoch < plan.epochs and not any(
            train_cache[i][1].any() for i in range(len(plan.train_set))):
        empty = ("every training mask is empty, so the model can only learn to find nothing; "
                 "check the label value and the masks")
        warnings.warn(empty[0].upper() + empty[1:] + ".", UserWarning, stacklevel=3)
        summary += f" (warning: {empty})"
    return summary


@dataclass
class RunState:
    """Where a run is: its step, the images it has seen, the best validation Dice (-1: none
    yet) and the best loss of this round, the epochs since either improved, its start time."""
    step: int
    best: float
    best_loss: float
    t0: float
    clock: Clock
    stale: int = 0
    seen: int = 0

    @classmethod
    def start(cls, plan: RunPlan, clock: Clock) -> RunState:
        # the validation set is kept across rounds (finetune passes its names back), so scores compare
        best = max((h["val_dice"] for h in plan.history if h.get("val_dice")), default=-1.0)
        best_loss = min((h["loss"] for h in plan.history if h.get("round", 1) == plan.round_no), default=math.inf)
        return cls(plan.start_epoch * plan.steps_per_epoch, best, best_loss, time.time(), clock)

    @property
    def best_dice(self) -> float | None:
        return self.best if self.best >= 0 else None

    def judge(self, val: float | None, epoch_loss: float) -> tuple[bool, bool]:
        """(improved, informative) for an epoch, the best and stale count updated. A validation
        Dice of 0 so far says nothing yet (a model that starts by predicting nothing on a new
        class): until it moves, the training loss decides."""
        informative = val is not None and (val > 0 or self.best > 0)
        improved = val > self.best if informative else epoch_loss < self.best_loss
        improved = improved and math.isfinite(epoch_loss) and (val is None or math.isfinite(val))
        if improved:
            self.best = val if informative else self.best
            self.best_loss, self.stale = min(self.best_loss, epoch_loss), 0
        else:
            self.stale += 1
        return improved, informative


def _train_step(backend: TorchBackend, plan: RunPlan, optim: Optimisation, cache: PairCache, batch: list[int],
                epoch: int, step: int, clock: Clock) -> float:
    """One optimiser step: this rank's corrections ``batch`` topped up with replay pairs and
    shuffled, made into images, targets and prompts; their loss; the step (with the weight
    average and a one-cycle schedule). The loss; a loss that is not finite stops the run."""
    s, rng, n_train = plan.settings, plan.rng, len(plan.train_set)
    idx = batch + [n_train + rng.randrange(len(plan.replay_set)) for _ in range(plan.n_replay)]
    rng.shuffle(idx)  # negatives are drawn for the first images: corrections and replay alike
    with clock("making batches"):
        pixels, target, prompts = _make_batch(cache, plan.pool, idx, s, rng, plan.np_rng, backend)
    examples = [plan.pool[i] for i in idx]
    if plan.adapter:  # replay images ask for the new class, which is absent there
        for j in (j for j, i in enumerate(idx) if i >= n_train):
            target[j], prompts[j] = 0, rng.choice(plan.new_prompts)
    else:
        _ask_own_class_where_absent(target, prompts, examples, plan.negatives, rng)
    with clock("optimiser steps"), torch.autocast(backend.device.type, dtype=optim.amp_dtype, enabled=optim.use_amp):
        loss = _loss(plan.learner, pixels, target, prompts, s, rng, None if plan.adapter else plan.negatives,
                     examples)
        if optim.start_weights is not None:
            loss = loss + s.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(plan.params, optim.start_weights))
    if not torch.isfinite(loss):
        raise TrainingError(f"The loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                            f"training stopped. {_stopped_message(plan.out)} Try a lower learning rate.")
    with clock("optimiser steps"):
        _optimiser_step(loss, optim.optimiser, optim.scaler, plan.params, s.grad_clip, plan.world)
        if optim.average is not None:
            optim.average.update(backend.module)
        if s.schedule == "onecycle":
            optim.schedule.step()
    return loss.item()


def _end_epoch(backend: TorchBackend, plan: RunPlan, optim: Optimisation, run: RunState, checkpoints: Checkpoints,
               val_cache: PairCache, epoch: int, losses: list[float]) -> tuple[Progress, bool]:
    """Validate, record the epoch in the history, judge it (best, stale), save what is due
    (the schedule's end is best/ when validation says nothing), step a plateau schedule. The
    epoch's Progress, and whether to stop early (no validation gain for ``patience`` epochs)."""
    s = plan.settings
    with run.clock("validation"):
        epoch_loss, val, report = _validate_epoch(backend, plan, optim, val_cache, losses)
    plan.history.append({"round": plan.round_no, "epoch": epoch + 1, "loss": epoch_loss, "val_dice": val,
                         "val_dice_by_set": report.by_set if report else None,
                         "val_cross_prompt_rate": report.cross_prompt_rate if report else None,
                         "lr": optim.optimiser.param_groups[0]["lr"], "elapsed": time.time() - run.t0})
    improved, informative = run.judge(val, epoch_loss)
    last_epoch = epoch + 1 == plan.epochs
    stopping = informative and run.stale >= s.patience
    checkpoints.meta.update(epochs_done=epoch + 1, history=plan.history, best_val_dice=run.best_dice)
    if plan.world > 1:  # every rank's weights, summarised, so a run can show they stayed identical
        checkpoints.meta["rank_weight_sums"] = _gather_weight_sums(backend)
    with _kept_weights(optim.average, backend.module):  # the schedule's end is kept when validation says nothing
        ckpt = checkpoints.save(improved, informative, final=last_epoch or stopping,
                                best_is_last=last_epoch and not informative, val=val)
    if s.schedule != "onecycle" and val is not None:
        optim.schedule.step(val)
    elapsed = time.time() - run.t0
    return Progress("epoch", epoch + 1, plan.epochs, run.step, plan.total, epoch_loss, val, run.best_dice, elapsed,
                    elapsed / max(epoch + 1 - plan.start_epoch, 1) * (plan.epochs - epoch - 1),
                    run.seen * plan.world / max(elapsed, 1e-9), ckpt,
                    val_by_set=report.by_set if report and len(report.by_set) > 1 else None), stopping


def _validate_epoch(backend: TorchBackend, plan: RunPlan, optim: Optimisation, val_cache: PairCache,
                    losses: list[float]) -> tuple[float, float | None, Validation | None]:
    """(mean training loss, validation Dice, the validation's report) of an epoch, on the
    weights that are saved; a distributed run takes rank 0's numbers."""
    s = plan.settings
    epoch_loss = float(np.mean(losses)) if losses else float("nan")
    report = None
    if plan.val_set:
        with _kept_weights(optim.average, backend.module):
            report = validate(backend, val_cache, plan.val_set, s.val_prompt_type, s.batch_size,
                              plan.negatives.concepts)
    val = report.dice if report else None
    if plan.world > 1:  # decisions (best, schedule, early stop) follow rank 0
        val, epoch_loss = _from_rank0(val, epoch_loss, device=backend.device)
    return epoch_loss, val, report


def _step_progress(plan: RunPlan, run: RunState, epoch: int, loss: float) -> Progress:
    elapsed = time.time() - run.t0
    rate = elapsed / max(run.step - plan.start_epoch * plan.steps_per_epoch, 1)
    return Progress("step", epoch, plan.epochs, run.step, plan.total, loss, best_dice=run.best, elapsed=elapsed,
                    eta=rate * (plan.total - run.step), images_per_s=run.seen * plan.world / max(elapsed, 1e-9))


def _stopped(plan: RunPlan, run: RunState, epoch: int) -> Progress:
    return Progress("stopped", epoch, plan.epochs, run.step, plan.total, float("nan"), best_dice=run.best,
                    elapsed=time.time() - run.t0, message=_stopped_message(plan.out))


def _stopped_early(plan: RunPlan, run: RunState, epoch_end: Progress, summary: str) -> Progress:
    return Progress("done", epoch_end.epoch, plan.epochs, run.step, plan.total, epoch_end.loss, epoch_end.val_dice,
                    run.best, epoch_end.elapsed, checkpoint=str(plan.out / BEST), timings=dict(run.clock),
                    message=f"{summary}; stopped early after epoch {epoch_end.epoch}: no validation gain "
                            f"for {plan.settings.patience} epochs.")


def _finish(plan: RunPlan, run: RunState, checkpoints: Checkpoints, summary: str) -> Progress:
    """The last Progress of a run through its schedule; best/ is written if a resumed run had
    nothing left to do."""
    why = "the schedule was already complete" if plan.start_epoch >= plan.epochs else \
        f"finished the schedule ({run.step} steps, {plan.epochs} epochs)"
    if not (plan.out / BEST).exists() and plan.rank == 0:  # a resumed run with nothing left to do
        checkpoints.save_best()
    history = plan.history
    return Progress("done", plan.epochs, plan.epochs, run.step, plan.total,
                    history[-1]["loss"] if history else float("nan"), history[-1]["val_dice"] if history else None,
                    run.best_dice, time.time() - run.t0, checkpoint=str(plan.out / BEST), message=f"{summary}; {why}.",
                    timings=dict(run.clock))


def _resume_point(out: Path, resume: bool, names: list[str], epochs: int) -> tuple[int, list, int]:
    """(first epoch, history, round) of a run: 0, [], 1 for a new one; where it stopped when
    resumed on the same set (the same image names); a new round from epoch 0 when examples were
    added or replaced."""
    if not (resume and (out / LAST).exists()):
        return 0, [], 1
    done = read_metadata(out / LAST)
    history, round_no = done.get("history", []), done.get("round", 1)
    same = (done["trained_names"] == names if "trained_names" in done
            else done.get("train_examples") == len(names))  # a run from before the names were kept
    if same:
        return min(done.get("epochs_done", 0), epochs), history, round_no
    return 0, history, round_no + 1


def _scheduler(opt, schedule: str, total: int, done_steps: int):
    """One-cycle over ``total`` steps (fast-forwarded past ``done_steps`` of a resumed run),
    or halving on a validation plateau."""
    if schedule != "onecycle":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=max(total, 1))
    with warnings.catch_warnings():  # fast-forwarding before any optimiser step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            sched.step()
    return sched


def _summary(n_distinct: int, n_train: int, n_replay: int, n_val: int, adapter: int | None = None,
             fresh: int | None = None, new_share: float | None = None) -> str:
    replayed = (f" with {n_replay} replay image(s) as negatives" if adapter
                else f" mixed with {n_replay} replay pair(s)")
    went_on = ""
    if fresh is not None:
        went_on = f", going on from a model trained on {n_distinct - fresh} of them" + (
            f" (the {fresh} new drawn about {new_share:.0%} of the time)" if new_share and 0 < fresh < n_distinct else "")
    return (f"Trained on {n_distinct} image(s)" + (f" ({n_train} with repeats)" if n_train != n_distinct else "")
            + (f" as adapter {adapter} of a new class (the base model is unchanged)" if adapter else "")
            + (replayed if n_replay else "") + went_on
            + f", validated on {n_val}" + ("" if n_val else " (every example trains)"))


def _optimiser_step(loss, opt, scaler, params, grad_clip: float, world: int) -> None:
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world > 1 and not NO_SYNC:
        _all_reduce_grads(params, world)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


def _param_groups(backend: TorchBackend, params, s: TrainSettings) -> list[dict]:
    """One optimiser group, or two when the image encoder learns at its own rate."""
    if s.encoder_lr_scale == 1.0:
        return [{"params": params, "lr": s.lr}]
    wanted = {id(p) for p in params}
    encoder = [p for n, p in backend.module.named_parameters()
               if id(p) in wanted and n.startswith(backend.image_encoder_prefixes)]
    ids = {id(p) for p in encoder}
    rest = [p for p in params if id(p) not in ids]
    return [g for g in ({"params": rest, "lr": s.lr}, {"params": encoder, "lr": s.lr * s.encoder_lr_scale})
            if g["params"]]


def _kept_weights(average: WeightAverage | None, module: torch.nn.Module):
    """The weights to validate and save: the moving average while there is one."""
    return average.applied(module) if average is not None else nullcontext()


def _key(ex: Example) -> str:
    return f"{ex.group}/{ex.name}"


def train_mode(module: torch.nn.Module, keep_norm_stats: bool = False) -> None:
    """Training mode, except batch norms whose weights are frozen (or all of them with
    ``keep_norm_stats``): their running statistics stay as they are, so a part that is not
    trained does not drift either, and a few images of a new domain do not shift the
    statistics every other domain is normalised with."""
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                keep_norm_stats or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def _stopped_message(out: Path) -> str:
    if (out / BEST).exists():
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


def training_data(data_dirs, val_split: str = "val", val_fraction: float | None = None, prompt: str | None = None,
                  seed: int = 0, val_names=None) -> tuple[list[Example], list[Example]]:
    """Pool several folders. A folder's anns/<val_split>.json is its validation set where it
    exists. Otherwise ``val_names`` ("folder/image" keys of an earlier run) are held out when
    given, so a resumed run is judged on the same images; else ``val_fraction`` of the
    examples (None: none below SMALL_SET examples in all, else 0.2)."""
    from napari_vlsm.core.data.training_sets import benchmark_examples, load_examples, split_examples

    loaded = []
    for d in map(Path, data_dirs):
        has_val = (d / "anns" / f"{val_split}.json").exists() and val_split != "train"
        loaded.append((d, load_examples(d, "train", prompt), has_val))
    n_split = sum(len(ex) for _, ex, has_val in loaded if not has_val)
    fraction = val_fraction if val_fraction is not None else (0.0 if n_split < SMALL_SET else 0.2)
    keep = set(val_names or ())
    train_set, val_set = [], []
    for d, examples, has_val in loaded:
        if has_val:
            train_set += examples
            val_set += benchmark_examples(d, val_split)
        elif val_names is not None:
            train_set += [e for e in examples if _key(e) not in keep]
            val_set += [e for e in examples if _key(e) in keep]
        else:
            tr, va = split_examples(examples, fraction, seed)
            train_set += tr
            val_set += va
    return train_set, val_set


def load_for_training(spec: str, device="auto", encoders=None) -> TorchBackend:
    """The model to finetune, in fp32: a spec for load_model, or a family's 'new:KEY' (with
    the pretrained ``encoders`` where the family starts from them)."""
    from napari_vlsm.core.models.families import NEW_PREFIX, new_backend
    from napari_vlsm.core.models.loading import load_model

    if str(spec).startswith(NEW_PREFIX):
        return new_backend(spec, device, encoders)

    backend = load_model(spec, device=device, dtype="fp32")
    if not isinstance(backend, TorchBackend):
        raise TrainingError(f"{spec} cannot be finetuned (an ONNX export); finetune its PyTorch folder instead.")
    return backend


def finetune(spec: str | None, data_dirs, out_dir, settings: TrainSettings | None = None, resume: bool = False,
             prompt: str | None = None, val_split: str = "val", device="auto", metadata: dict | None = None,
             stop: threading.Event | None = None, encoders=None) -> Iterator[Progress]:
    """Load data and model, then ``train``: the whole job behind the CLI and the widget.
    ``spec``: the model to train (None: the default); a resumed run goes on from its last/,
    and a ``spec`` that names another model than the run's is refused."""
    s = settings or TrainSettings()
    check_run_folder(out_dir, resume)
    last = Path(out_dir) / LAST
    previous = read_metadata(last) if resume else {}
    if resume:
        check_resumed_model(spec, Path(out_dir), previous)
    spec = "default" if spec is None else spec
    clock = Clock()
    try:
        with clock("listing data"):
            train_set, val_set = training_data(data_dirs, val_split, s.val_fraction, prompt, s.seed,
                                               previous.get("val_names"))
    except (FileNotFoundError, ValueError) as exc:
        raise TrainingError(str(exc)) from exc
    start = str(last) if resume and (last / CONFIG).exists() else spec
    with clock("loading the model"):
        backend = load_for_training(start, device, encoders)
    folder = local_folder(start)
    replay = replay_dir(folder) if s.replay_fraction != 0 else None
    meta = {"data": [str(d) for d in data_dirs], "prompt": prompt, **(metadata or {})}
    if previous.get("base_model"):  # a resumed run was trained from its base, not from its own last/
        meta.setdefault("base_model", previous["base_model"])
    yield from train(backend, train_set, val_set, out_dir, s, resume=resume, metadata=meta, stop=stop, replay=replay,
                     card=read_card(folder), clock=clock, before=read_metadata(folder) if folder else None)


def check_resumed_model(spec, out: Path, previous: dict) -> None:
    """Refuse (TrainingError) to resume a run with a ``spec`` that names another model than
    the one it was trained from: resuming goes on from its last/, and the model would be
    silently ignored. None, the run's base model or its own checkpoints pass."""
    from napari_vlsm.core.models.loading import model_identity

    base = previous.get("base_model")
    if spec is None or base is None:
        return
    if model_identity(spec) not in {model_identity(base), model_identity(out / LAST), model_identity(out / BEST)}:
        raise TrainingError(f"{out} holds a run trained from the model {base}; resuming goes on from {out / LAST}, "
                            f"so the model {spec} would be ignored. To resume, give no model (or {base}); to train "
                            f"{spec}, use a new output folder.")


def oversample(examples: list[Example], repeat: dict) -> list[Example]:
    """Each example of data set ``g`` ``repeat[g]`` times (1 for sets not named): a small set
    of a pooled run is drawn as often as the others instead of being learned last."""
    unknown = set(repeat) - {e.group for e in examples} - {e.kind for e in examples}
    if unknown:
        raise TrainingError(f"--repeat names {', '.join(sorted(unknown))}, which no training folder (or "
                            f"FOLDER:TARGET) is; the folders are: {', '.join(sorted({e.group for e in examples}))}.")
    if any(int(n) < 1 for n in repeat.values()):
        raise TrainingError("--repeat needs a whole number of times, at least 1 (e.g. --repeat busi=2).")
    return [e for e in examples for _ in range(int(repeat.get(e.kind, repeat.get(e.group, 1))))]


def check_run_folder(out_dir, resume: bool) -> None:
    """Refuse to overwrite a run that is there, or to resume one that is not; first put the
    folder back in order if a kill interrupted a checkpoint swap."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; give a folder for the checkpoints.")
    recover_checkpoints(out)
    held = [name for name in (BEST, LAST) if (out / name).exists()]
    if held and not resume:
        score = read_metadata(out / BEST).get("best_val_dice") if (out / BEST).exists() else None
        raise TrainingError(f"{out} already holds a training run ({' and '.join(f'{n}/' for n in held)}"
                            + (f", best val Dice {score:.3f}" if isinstance(score, (int, float)) else "")
                            + "). Add --resume to go on with it, or choose a new --out; nothing was changed.")
    if resume and not (out / LAST / CONFIG).exists():
        raise TrainingError(f"Nothing to resume in {out}: it has no last/ checkpoint. Run without --resume "
                            "to start there.")
