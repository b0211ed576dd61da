"""What a training run yields: ``Progress`` events and the builders of each kind (step, stop,
early stop, the end with its summary). ``plan`` and ``run`` are the loop's ``RunPlan`` and
``RunState`` (``train.py``, which imports this module, so they are not annotated here)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

from napari_vlsm.core.data.training_sets import PairCache
from napari_vlsm.core.training.checkpoint import BEST
from napari_vlsm.core.training.checkpoint_policy import Checkpoints, stopped_message


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


def step_progress(plan, run, epoch: int, loss: float) -> Progress:
    elapsed = time.time() - run.t0
    rate = elapsed / max(run.step - plan.start_epoch * plan.steps_per_epoch, 1)
    return Progress("step", epoch, plan.epochs, run.step, plan.total, loss, best_dice=run.best, elapsed=elapsed,
                    eta=rate * (plan.total - run.step), images_per_s=run.seen * plan.world / max(elapsed, 1e-9))


def stopped_progress(plan, run, epoch: int) -> Progress:
    return Progress("stopped", epoch, plan.epochs, run.step, plan.total, float("nan"), best_dice=run.best,
                    elapsed=time.time() - run.t0, message=stopped_message(plan.out))


def stopped_early_progress(plan, run, epoch_end: Progress, summary: str) -> Progress:
    return Progress("done", epoch_end.epoch, plan.epochs, run.step, plan.total, epoch_end.loss, epoch_end.val_dice,
                    run.best, epoch_end.elapsed, checkpoint=str(plan.out / BEST), timings=dict(run.clock),
                    message=f"{summary}; stopped early after epoch {epoch_end.epoch}: no validation gain "
                            f"for {plan.settings.patience} epochs.")


def finish_progress(plan, run, checkpoints: Checkpoints, summary: str) -> Progress:
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


def summary_text(n_distinct: int, n_train: int, n_replay: int, n_val: int, adapter: int | None = None,
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


def run_summary(plan, train_cache: PairCache) -> str:
    """What the run trains on, for its last message, with a warning (also raised, pointing at
    the caller of train()) when every training mask is empty."""
    summary = summary_text(plan.n_distinct, plan.n_repeated, len(plan.replay_set), len(plan.val_set), plan.adapter,
                           plan.n_fresh, plan.settings.new_share)
    if plan.rank == 0 and plan.start_epoch < plan.epochs and not any(
            train_cache[i][1].any() for i in range(len(plan.train_set))):
        empty = ("every training mask is empty, so the model can only learn to find nothing; "
                 "check the label value and the masks")
        warnings.warn(empty[0].upper() + empty[1:] + ".", UserWarning, stacklevel=3)
        summary += f" (warning: {empty})"
    return summary
