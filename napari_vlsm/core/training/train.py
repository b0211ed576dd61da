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

This module plans a run and runs its loop; the loss (``loss.py``), validation
(``validation.py``), the helpers of a run over several processes (``distributed.py``), when
checkpoints are written (``checkpoint_policy.py``), the progress events (``progress.py``) and
the clock of a run's phases (``clock.py``) each have a module of their own.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from napari_vlsm.core.data.concepts import NegativePrompts, add_synonyms
from napari_vlsm.core.data.prompts import SYNONYM_TYPE
from napari_vlsm.core.data.replay import REPLAY_DIR, replay_dir, replay_examples
from napari_vlsm.core.data.training_sets import Example, PairCache, augment
from napari_vlsm.core.device import cpu_threads
from napari_vlsm.core.errors import TrainingError
from napari_vlsm.core.file_names import CONFIG
from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.models.loading import local_folder
from napari_vlsm.core.models.model_card import CARD_FILE, card_after_finetune, read_card
from napari_vlsm.core.models.train_modes import AUTO_MODE, TRAIN_MODES
from napari_vlsm.core.training.adapters import AdapterView, adapter_parameters, plan_adapter, prepare_adapter
from napari_vlsm.core.training.checkpoint import BEST, LAST, check_writable, read_metadata, recover_checkpoints
from napari_vlsm.core.training.checkpoint_policy import Checkpoints, resume_point, stopped_message
from napari_vlsm.core.training.distributed import (all_reduce_grads, from_rank0, gather_weight_sums,
                                                   init_distributed, start_from_rank0, world_and_rank)
from napari_vlsm.core.training.loss import batch_loss, dice_bce_loss
from napari_vlsm.core.training.clock import Clock
from napari_vlsm.core.training.progress import (Progress, finish_progress, run_summary, step_progress,
                                                stopped_early_progress, stopped_progress)
from napari_vlsm.core.training.settings import SMALL_SET, TRAIN_MODES_OFFERED, TrainSettings
from napari_vlsm.core.training.validation import Validation, validate
from napari_vlsm.core.training.weight_average import WeightAverage

# Kept importable from here, where the CLI, the Finetune dock, the scripts and the tests found them.
__all__ = ["Clock", "Progress", "SMALL_SET", "TRAIN_MODES_OFFERED", "TrainSettings", "Validation", "dice_bce_loss",
           "finetune", "init_distributed", "train", "training_data", "trained_prompts"]

NO_SYNC = os.environ.get("NAPARI_VLSM_NO_GRAD_SYNC") == "1"  # diagnostic: ranks drift apart (tests show it)


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
        start_from_rank0(backend, plan.world)
        optim = make_optimisation(backend, plan)
    with clock("reading images"):
        train_cache, val_cache = PairCache(plan.pool, backend.input_size), PairCache(plan.val_set, backend.input_size)
        train_cache.load_all()
    run = RunState.start(plan, clock)
    checkpoints = _checkpoints(backend, plan, metadata, replay, card, clock)
    summary = run_summary(plan, train_cache)

    for epoch in range(plan.start_epoch, plan.epochs):
        train_mode(backend.module, plan.settings.keep_norm_stats)
        losses = []
        for batch in plan.batches(epoch):
            if stop is not None and stop.is_set():
                yield stopped_progress(plan, run, epoch)
                return
            losses.append(_train_step(backend, plan, optim, train_cache, batch, epoch, run.step, clock))
            run.step += 1
            run.seen += len(batch) + plan.n_replay
            yield step_progress(plan, run, epoch, losses[-1])
        progress, stopping = _end_epoch(backend, plan, optim, run, checkpoints, val_cache, epoch, losses)
        yield progress
        if stopping:
            yield stopped_early_progress(plan, run, progress, summary)
            return
    yield finish_progress(plan, run, checkpoints, summary)


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
    world, rank = world_and_rank()
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
    s = replace(s, lr=s.learning_rate(backend, adapter=bool(adapter), new_adapter=bool(adapter) and not known))
    n_replay = min(int(round(s.batch_size * s.replay_fraction)), s.batch_size - 1) if replay_set else 0
    n_new = s.batch_size - n_replay
    steps_per_epoch = len(_batches(len(train_set), n_new, s.seed, world, rank))
    if not s.epochs:
        s = replace(s, steps=s.round_steps(n_distinct, n_new))
    epochs = s.epochs or max(1, round(s.steps / steps_per_epoch))
    start_epoch, history, round_no = resume_point(out, resume, names, epochs)
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
        loss = batch_loss(plan.learner, pixels, target, prompts, s, rng, None if plan.adapter else plan.negatives,
                     examples)
        if optim.start_weights is not None:
            loss = loss + s.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(plan.params, optim.start_weights))
    if not torch.isfinite(loss):
        raise TrainingError(f"The loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                            f"training stopped. {stopped_message(plan.out)} Try a lower learning rate.")
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
        checkpoints.meta["rank_weight_sums"] = gather_weight_sums(backend)
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
        val, epoch_loss = from_rank0(val, epoch_loss, device=backend.device)
    return epoch_loss, val, report


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


def _optimiser_step(loss, opt, scaler, params, grad_clip: float, world: int) -> None:
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world > 1 and not NO_SYNC:
        all_reduce_grads(params, world)
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
        raise TrainingError(f"TrainSettings.repeat names {', '.join(sorted(unknown))}, which no training folder (or "
                            f"FOLDER:TARGET) is; the folders are: {', '.join(sorted({e.group for e in examples}))}.")
    if any(int(n) < 1 for n in repeat.values()):
        raise TrainingError("TrainSettings.repeat needs a whole number of times, at least 1 (e.g. {'busi': 2}).")
    return [e for e in examples for _ in range(int(repeat.get(e.kind, repeat.get(e.group, 1))))]


def check_run_folder(out_dir, resume: bool) -> None:
    """Refuse to overwrite a run that is there, or to resume one that is not; first put the
    folder back in order if a kill interrupted a checkpoint swap."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"out_dir {out} is a file; give a folder for the checkpoints.")
    recover_checkpoints(out)
    held = [name for name in (BEST, LAST) if (out / name).exists()]
    if held and not resume:
        score = read_metadata(out / BEST).get("best_val_dice") if (out / BEST).exists() else None
        raise TrainingError(f"{out} already holds a training run ({' and '.join(f'{n}/' for n in held)}"
                            + (f", best val Dice {score:.3f}" if isinstance(score, (int, float)) else "")
                            + "). Go on with it with resume=True, or choose a new out_dir; nothing was changed.")
    if resume and not (out / LAST / CONFIG).exists():
        raise TrainingError(f"Nothing to resume in {out}: it has no last/ checkpoint. Run without resume=True "
                            "to start there.")
