"""The simulated annotator: does the model need fewer corrections as it learns from them,
and does it keep what it knew?

Leave-one-domain-out on ../shared/data. A base model that never saw the new domain (the
project's earlier embedded model, trained on Kvasir-SEG and CVC-ClinicDB only) meets a new
domain (BUSI breast ultrasound). Each round the current model segments N new training images
of that domain with the annotator's prompt; effort is what the annotator must fix (wrong
pixels as a share of the image, and 1 - Dice); the ground truth stands in for the corrected
masks, which join the corrections folder; then `napari-vlsm finetune` with its defaults
trains the next model from the current one, as the widget does. After each round: Dice on a
fixed test set of the new domain (its val split), Dice on Kvasir-SEG val with "polyp"
(forgetting), and the share of new-domain images where "polyp" draws a mask over 1%.

Arms: the recipe as shipped (replay sample mixed in) and the same without replay; or, with
``--orders``, the shipped recipe with the next images chosen in each order: ``random`` (a fixed
permutation of the pool), ``name`` (the folder's order, as the series walked it), the most
uncertain first under the current model by each score of ``core/inference/uncertainty.py``, or
by kind of image (``core/inference/kinds.py``): ``typical`` (the most typical image of each
group), ``typical+SCORE`` (its least sure one) and ``kinds``, the series' default: ``typical+``
the default score with one image in four drawn at random, on which the estimate is read.
Each ordering row also has the stop signal: the Dice the series would estimate for the images
not yet corrected (its proposals' agreement with the last 10 corrections) beside their true
Dice under the same model. ``--score-check`` prints, for the base model, how well each score
ranks the pool by its true error (Spearman), the cheap way to shortlist scores.

    python benchmarks/bench_corrections.py --base runs/polyp_base --replay-from \\
        ../shared/data/kvasir_seg ../shared/data/clinicdb --threads 2 --plot docs/corrections.png

Extract the base with: git archive 4623722 napari_vlsm/assets/polyp_film_unet | tar -x -C /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import TWO_MODALITY_DEFAULT, machine, model_from_git  # noqa: E402

from napari_vlsm.core.models.loading import load_model  # noqa: E402
from napari_vlsm.core.images.metrics import dice  # noqa: E402
from napari_vlsm.core.inference.predictor import Predictor  # noqa: E402
from napari_vlsm.core.data.replay import REPLAY_DIR, write_replay_sample  # noqa: E402
from napari_vlsm.core.data.training_sets import benchmark_examples  # noqa: E402
from napari_vlsm.core.inference.kinds import by_kind  # noqa: E402
from napari_vlsm.core.inference.ordering import order_images  # noqa: E402
from napari_vlsm.core.inference.series import estimate_of  # noqa: E402
from napari_vlsm.core.inference.uncertainty import (  # noqa: E402
    DEFAULT_SCORE, SCORES, most_uncertain_first, score_image)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def scores(pred: Predictor, examples, prompts: list[str]) -> dict:
    """Per prompt: mean Dice, wrong pixels, the share of images with a mask over 1%, the mean
    Dice of the images that show the object and the share of those that do not left empty
    (any pixel drawn there scores Dice 0), each image read and encoded once for all the prompts."""
    d, wrong, hits = ([[] for _ in prompts] for _ in range(3))
    shows = []
    for ex in examples:
        image, truth = ex.load()
        shows.append(bool(truth.any()))
        pred.set_image(image)
        for k, mask in enumerate(pred.predict(prompts).masks):
            d[k].append(dice(mask, truth))
            wrong[k].append(float((mask != truth).mean()))
            hits[k].append(float(mask.mean() > 0.01))
    shows = np.array(shows)

    def mean(values, where):
        return float(np.mean(np.asarray(values)[where])) if where.any() else float("nan")

    return {p: {"dice": float(np.mean(d[k])), "wrong": float(np.mean(wrong[k])), "hits": float(np.mean(hits[k])),
                "dice_object": mean(d[k], shows), "empty_right": mean(d[k], ~shows)}
            for k, p in enumerate(prompts)}


def on_test_columns(on_test: dict) -> dict:
    """A row's test-set columns from ``scores`` of the annotator's prompt."""
    return {"test_dice": on_test["dice"], "test_dice_object": on_test["dice_object"],
            "test_empty_right": on_test["empty_right"]}


def base_probabilities(model: str, examples, prompt: str) -> list:
    """The probabilities ``model`` gives ``prompt`` on ``examples``: the old skill, to compare
    bit for bit with the base's after each round."""
    pred = Predictor(load_model(model, device="cpu", dtype="fp32"))
    out = []
    for ex in examples:
        pred.set_image(ex.load()[0])
        out.append(pred.predict([prompt]).probs[0])
    return out


def add_corrections(folder: Path, examples, prompt: str) -> None:
    """The ground truth stands for the annotator's corrected masks: copy the pairs in."""
    ann = folder / "anns" / "train.json"
    rows = json.loads(ann.read_text()) if ann.exists() else []
    for ex in examples:
        for sub, src in (("images", Path(ex.image)), ("masks", Path(ex.mask))):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, folder / sub / src.name)
        rows.append({"img_name": Path(ex.image).name, "mask_name": Path(ex.mask).name, "cat": 0,
                     "prompts": {"p1": prompt}})
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(rows))


def uncertainty(model: str, examples, prompt: str) -> dict:
    """Every score of each example under ``model`` (the two views compared, not averaged)."""
    pred = Predictor(load_model(model, device="cpu", dtype="fp32"), flip_average=False)
    return {ex.image: score_image(pred, ex.load()[0], prompt) for ex in examples}


def in_turn(folder_order: list, scores: dict, kind: str) -> list:
    """``folder_order`` (keys) reordered to take the most uncertain and the next in folder order
    in turn. The folder's share keeps showing the annotator images the model is sure of, where
    a confident false mask (an image without the object) is found only by looking."""
    uncertain = most_uncertain_first({k: scores[k] for k in folder_order if k in scores}, kind)
    uncertain += [k for k in folder_order if k not in scores]
    out, seen, sources = [], set(), (iter(uncertain), iter(folder_order))
    while len(out) < len(set(folder_order)):
        for source in sources:
            k = next((k for k in source if k not in seen), None)
            if k is not None:
                out.append(k)
                seen.add(k)
    return out


def described(model: str, left: list, done: list, prompt: str, within: str):
    """The images grouped by ``core/inference/kinds.py``, the corrected ones (``done``) first and
    then ``left``, under ``model``: their descriptions by the image encoder, which are done, and
    with ``within`` (a score) each one's uncertainty (0 for the done ones), else None."""
    pred = Predictor(load_model(model, device="cpu", dtype="fp32"))
    every = done + left
    emb = np.concatenate([pred.embed([ex.load()[0] for ex in every[i:i + 16]]) for i in range(0, len(every), 16)])
    flags = np.arange(len(every)) < len(done)
    values = None
    if within:
        by_image = uncertainty(model, left, prompt)
        values = [0.0] * len(done) + [by_image[ex.image].value(within) for ex in left]
    return every, emb, flags, values


def typical(model: str, left: list, done: list, n: int, prompt: str, seed: int, within: str) -> list:
    """The next ``n`` of ``left`` by ``core/inference/kinds.py``: the images grouped with the
    corrected ones (``done``) under ``model``'s image encoder; from each group the most typical
    image, or with ``within`` (a score) its least sure one."""
    every, emb, flags, values = described(model, left, done, prompt, within)
    return [every[i] for i in by_kind(emb, flags, n, seed=seed, scores=values)]


def choose(order: str, model: str, left: list, n: int, prompt: str, candidates: int, done=(), seed: int = 0,
           check_seed: int = 0) -> tuple[list, list]:
    """The next ``n`` images of ``left`` to correct, in ``order``, and those of them drawn at
    random (the order by kind's checks). ``random``: the pool's own order, a seeded permutation
    (``split_pool``); ``name``, ``kinds`` and the most uncertain first by a score are
    ``order_images``'s orders, the series' and ``rank``'s; by a score, the most uncertain of the
    next ``candidates`` (a batch an annotator is handed), where the score tells the candidates
    nothing apart (a model that finds nothing anywhere is sure of every image), the first ones,
    as random order has them. ``typical`` (``typical+SCORE``) groups the whole pool with the
    ``done`` images; ``kinds`` is ``typical+`` the default score with the series' random checks
    (drawn with ``check_seed``)."""
    if order == "random":
        return left[:n], []
    if order == "name":
        ranked = order_images("name", [False] * len(left), names=[Path(ex.image).name for ex in left])
        return [left[i] for i in ranked.rows[:n]], []
    if order == "kinds":
        every, emb, flags, values = described(model, left, list(done), prompt, DEFAULT_SCORE)
        ranked = order_images("kinds", flags, values, emb, n=n, seed=seed, check_seed=check_seed)
        return [every[i] for i in ranked.rows[:ranked.chosen]], [every[i] for i in ranked.drawn]
    if order.startswith("typical"):
        return typical(model, left, list(done), n, prompt, seed, order.partition("+")[2]), []
    pool = left[:candidates]
    kind, _, turns = order.partition("+")
    scores = uncertainty(model, pool, prompt)
    if turns == "folder":
        keyed = {ex.image: ex for ex in pool}
        return [keyed[k] for k in in_turn(list(keyed), scores, kind)[:n]], []
    if len({round(scores[ex.image].value(kind), 6) for ex in pool}) == 1:
        return pool[:n], []
    ranked = order_images("uncertain", [False] * len(pool), [scores[ex.image].value(kind) for ex in pool])
    return [pool[i] for i in ranked.rows[:n]], []


def score_check(args) -> None:
    """How well each score ranks the pool by the base model's error (Spearman's rho)."""
    from scipy.stats import spearmanr

    # the pool as the rounds see it, less the first round's images (a --score-model of round 1 trained on them)
    pool = split_pool(args)[0][args.per_round:][:args.estimate_sample * 3]
    model = args.score_model or args.base_with_replay
    scores = uncertainty(model, pool, args.prompt)
    pred = Predictor(load_model(model, device="cpu", dtype="fp32"))
    error = []
    for ex in pool:
        image, truth = ex.load()
        pred.set_image(image)
        error.append(1 - dice(pred.predict([args.prompt]).masks[0], truth))
    print(f"\n| score | Spearman rho with 1 - Dice ({len(pool)} images of {Path(args.domain).name}, {model}) |")
    print("|---|---|")
    for kind in SCORES:
        rho = spearmanr([scores[ex.image].value(kind) for ex in pool], error).statistic
        print(f"| {kind} | {rho:.3f} |")


def batch_check(args) -> None:
    """The first ``--per-round`` images each order hands the annotator under the base model, on a
    folder of video frames numbered in order (CVC-ClinicDB): how many are near copies (another
    of them within 3 frames), how many different stretches of 50 frames they come from, and the
    base's mean 1 - Dice on them (how much there is to correct)."""
    pool = domain_examples(args, "train")
    pool = shuffled(pool, args.seed)
    model = args.base_with_replay
    pred = Predictor(load_model(model, device="cpu", dtype="fp32"))
    error = {}
    for ex in pool:
        image, truth = ex.load()
        pred.set_image(image)
        error[ex.image] = 1 - dice(pred.predict([args.prompt]).masks[0], truth)
    print(f"\n| order | near copies among the first {args.per_round} | stretches of 50 frames | mean 1 - Dice "
          f"({Path(args.domain).name} train, {len(pool)} frames, {model}) |")
    print("|---|---|---|---|")
    for order in args.orders:
        batch, _ = choose(order, model, pool, args.per_round, args.prompt, len(pool), [], args.seed)
        frames = np.array([int(Path(ex.image).stem) for ex in batch])
        near = int(sum((np.abs(frames - f) <= 3).sum() > 1 for f in frames))
        print(f"| {order} | {near} | {len(set(frames // 50))} | {np.mean([error[ex.image] for ex in batch]):.3f} |")


def finetune(args, data: Path, model: str, out: Path, extra: list[str]) -> dict:
    """``napari-vlsm finetune`` as a user runs it, timed from the command to its exit; its summary
    and where the time went (its "Time:" line)."""
    cmd = [sys.executable, "-m", "napari_vlsm.cli", "finetune", str(data), "--model", model,
           "--out", str(out), "--device", "cpu", *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        sys.exit(f"finetune failed ({out}):\n{res.stdout}\n{res.stderr}")
    lines = (res.stdout + res.stderr).splitlines()
    timings = next((ln[ln.index("Time: ") + len("Time: "):].strip() for ln in lines if "Time: " in ln), "")
    return {"train_s": wall, "summary": next((ln.strip() for ln in lines if ln.startswith("Trained on")), ""),
            "timings": timings}


def ceiling(args, name: str, extra: list[str]) -> dict:
    """An adapter trained once on the whole training split of the domain with the arm's recipe:
    how far the rounds of corrections are from all the data."""
    pool, test = split_pool(args)
    work = Path(args.work) / (name.replace(": ", "_") + "_ceiling")
    shutil.rmtree(work, ignore_errors=True)
    add_corrections(work / "corrections", pool, args.prompt)
    row = {"arm": f"{name}: ceiling", "corrections": len(pool), "trained_on": len(pool),
           **finetune(args, work / "corrections", args.base_with_replay, work / "run", extra)}
    pred = Predictor(load_model(str(work / "run" / "best"), device="cpu", dtype="fp32"))
    on_test = scores(pred, test, [args.prompt])[args.prompt]
    row.update(on_test_columns(on_test))
    row["base_dice"] = scores(pred, benchmark_examples(Path(args.forget_set), "val"), ["polyp"])["polyp"]["dice"]
    print(json.dumps(row), flush=True)
    return row


def domain_examples(args, split: str) -> list:
    """The domain's rows of ``split``; in a folder of several targets on the same images
    (chest_xray), only the rows of ``--target``."""
    rows = benchmark_examples(Path(args.domain), split)
    if args.target:
        rows = [ex for ex in rows if ex.target == args.target.casefold()]
        if not rows:
            sys.exit(f"{args.domain} has no {split} rows of target {args.target!r}")
    return rows


def shuffled(pool: list, seed: int) -> list:
    """The pool in ``order_images``' random order: the order the random arm corrects it in."""
    return [pool[i] for i in order_images("random", [False] * len(pool), seed=seed).rows]


def split_pool(args) -> tuple[list, list]:
    """The annotator's pool (the domain's training split less ``--test-from-pool`` images, in
    the order of ``--seed``) and the test set (its val split and those images, the same for
    every seed)."""
    train = domain_examples(args, "train")
    held = set(np.random.default_rng(12345).permutation(len(train))[:args.test_from_pool].tolist())
    pool = [ex for i, ex in enumerate(train) if i not in held]
    return shuffled(pool, args.seed), domain_examples(args, "val") + [train[i] for i in sorted(held)]


def run_arm(args, name: str, extra: list[str], order: str = "random") -> list[dict]:
    work = Path(args.work) / name.replace(": ", "_")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pool, test = split_pool(args)
    agreements: list = []  # [image, Dice of the proposal and the correction], as series.json has them
    checks: list = []  # the images handed out at random (the order by kind), as series.json has them
    corrected: list = []
    base_set = benchmark_examples(Path(args.forget_set), "val")
    model, rows = args.base_with_replay, []
    kept = base_probabilities(model, base_set[:args.bit_check], "polyp")
    for r in range(args.rounds + 1):
        row = {"arm": name, "corrections": r * args.per_round, "domain": Path(args.domain).name,
               "pool_order": args.seed}
        pred = Predictor(load_model(model, device="cpu", dtype="fp32"))
        on_test = scores(pred, test, [args.prompt, "polyp"])
        on_base = scores(pred, base_set, ["polyp", args.prompt])
        row.update(on_test_columns(on_test[args.prompt]), polyp_on_domain=on_test["polyp"]["hits"],
                   base_dice=on_base["polyp"]["dice"], new_on_base=on_base[args.prompt]["hits"])
        now = base_probabilities(model, base_set[:args.bit_check], "polyp")
        row["polyp_max_change"] = float(max(np.abs(a - b).max() for a, b in zip(now, kept)))
        if r == args.rounds:
            rows.append(row)
            break
        batch, drawn = choose(order, model, pool, args.per_round, args.prompt, args.candidates, corrected,
                              args.seed, check_seed=args.seed * 100 + r)
        checks += [ex.image for ex in drawn]  # the order by kind's random checks, for the stop estimate
        pool = [ex for ex in pool if ex not in batch]
        corrected += batch
        effort = scores(pred, batch, [args.prompt])[args.prompt]
        row.update(effort_wrong=effort["wrong"], effort_1_minus_dice=1 - effort["dice"])
        for ex in batch:  # what the series records: its proposal's agreement with the correction
            image, truth = ex.load()
            pred.set_image(image)
            agreements.append([ex.image, dice(pred.predict([args.prompt]).masks[0], truth)])
        left = scores(pred, pool[:args.estimate_sample], [args.prompt])[args.prompt]
        row.update(estimated_dice=estimate_of({"agreements": agreements, "checks": checks})[0],
                   true_dice_left=left["dice"])
        add_corrections(work / "corrections", batch, args.prompt)
        out = work / f"round{r + 1}"
        done_before = args.trained.get((model, tuple(ex.image for ex in batch), tuple(extra)))
        if done_before and r == 0:  # the same first round as an earlier arm's: training is deterministic
            shutil.copytree(done_before[0], out)
            row.update(train_s=done_before[1], summary=done_before[2], reused=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            model = str(out / "best")
            continue
        row.update(finetune(args, work / "corrections", model, out, extra), trained_on=(r + 1) * args.per_round)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.trained[(model, tuple(ex.image for ex in batch), tuple(extra))] = (out, row["train_s"], row["summary"])
        model = str(out / "best")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="Model folder that has not seen --domain, or git:REV for the embedded default "
                                   f"at commit REV ({TWO_MODALITY_DEFAULT}: the default before skin, chest X-ray and "
                                   "fetal ultrasound joined, which has never seen those).")
    ap.add_argument("--report-from", nargs="*", default=[],
                    help="Only print the table (and plot) of earlier runs' results.json, together.")
    ap.add_argument("--replay-from", nargs="*", default=[], help="The base's training folders (for its replay "
                                                                   "sample, when it has none).")
    ap.add_argument("--replay-per-set", type=int, default=24, help="Pairs of each --replay-from folder.")
    ap.add_argument("--domain", default=str(DATA / "busi"))
    ap.add_argument("--target", default="", help="In a folder of several targets on the same images (chest_xray), "
                                                 "the rows of this one (its p1, e.g. 'COVID-19 lung infection').")
    ap.add_argument("--prompt", default="breast tumor", help="What the annotator types for the new domain.")
    ap.add_argument("--forget-set", default=str(DATA / "kvasir_seg"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm", action="append", default=[],
                    help="NAME=FINETUNE ARGS, repeatable (default: 'replay=' (the CLI defaults) and "
                         "'no-replay=--replay-fraction 0').")
    ap.add_argument("--orders", nargs="*", default=[],
                    help=f"Orderings to compare with the shipped recipe: random, name, {', '.join(SCORES)}, "
                         "SCORE+folder (the most uncertain and the next in pool order in turn), typical (the typical "
                         "image of each group of images not yet covered), typical+SCORE (its least sure one) or kinds (the "
                         "series' default: typical+ the default score, one in four drawn at random).")
    ap.add_argument("--test-from-pool", type=int, default=0,
                    help="Training images of the domain moved from the pool to the test set (fixed, whatever the "
                         "seed): a larger test set separates orderings better than the 78 of BUSI's val split.")
    ap.add_argument("--estimate-sample", type=int, default=60,
                    help="Images not yet corrected on which the true Dice beside the estimate is measured.")
    ap.add_argument("--candidates", type=int, default=120,
                    help="Images of the pool scored each round for an ordering arm (the most uncertain 20 of them).")
    ap.add_argument("--score-model", default="", help="For --score-check: the model to score with (default: the base).")
    ap.add_argument("--score-check", action="store_true", help="Only rank the pool by each score (no training).")
    ap.add_argument("--batch-check", action="store_true",
                    help="Only show the first --per-round images of each --orders on a folder of numbered video "
                         "frames (--domain): near copies among them, and how much there is to correct on them.")
    ap.add_argument("--rescore", default="", help="A run's --work folder: score its saved models on the test set again "
                                                  "(the columns added since it ran), then print its table.")
    ap.add_argument("--ceiling", action="store_true",
                    help="Also train each arm's recipe once on the domain's whole training split.")
    ap.add_argument("--bit-check", type=int, default=10,
                    help="Kvasir val images on which the base's 'polyp' probabilities are compared after each round.")
    ap.add_argument("--work", default="runs/bench_corrections")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    if args.report_from:
        rows = [r for w in args.report_from for r in _tagged(w)]
        return report(rows, args.plot)
    if args.rescore:
        return rescore(args)
    if not args.base:
        ap.error("--base is required")
    import torch

    torch.set_num_threads(args.threads)
    base = Path(args.work) / "base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(model_from_git(args.base), base)
    if not (base / REPLAY_DIR).exists() and args.replay_from:
        write_replay_sample(args.replay_from, base, per_set=args.replay_per_set)
    args.base_with_replay = str(base)
    args.trained = {}
    print(f"Machine: {machine()}; finetune threads: {args.threads}")
    if args.score_check:
        return score_check(args)
    if args.batch_check:
        return batch_check(args)
    rows = []
    for order in args.orders:
        rows += run_arm(args, f"order: {order}" + (f", pool order {args.seed}" if args.seed else ""), [], order)
        (Path(args.work) / "results.json").write_text(json.dumps(rows, indent=1))
    for arm in args.arm or ([] if args.orders else ["replay=", "no-replay=--replay-fraction 0"]):
        name, _, extra = arm.partition("=")
        rows += run_arm(args, name, extra.split())
        if args.ceiling:
            rows.append(ceiling(args, name, extra.split()))
        (Path(args.work) / "results.json").write_text(json.dumps(rows, indent=1))
    report(rows, args.plot)


def rescore(args) -> None:
    """The test columns of a finished run again, from the models it saved (training is not rerun)."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.rescore)
    rows = json.loads((work / "results.json").read_text())
    test = domain_examples(args, "val")
    for row in rows:
        arm = row["arm"].removesuffix(": ceiling").replace(": ", "_")
        if row["arm"].endswith(": ceiling"):
            model = work / f"{arm}_ceiling" / "run" / "best"
        elif row["corrections"]:
            model = work / arm / f"round{row['corrections'] // args.per_round}" / "best"
        else:
            model = work / "base"
        on_test = scores(Predictor(load_model(str(model), device="cpu", dtype="fp32")), test, [args.prompt])[args.prompt]
        row.update(on_test_columns(on_test))
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    report(rows, args.plot)


def report(rows, plot_path=""):
    print()
    print("| arm | corrections | effort: wrong pixels | effort: 1 - Dice | test Dice | test Dice, images with the object "
          "| test images without it left empty | polyp Dice (Kvasir val) "
          "| 'polyp' largest change | 'polyp' hits on new domain | new prompt hits on Kvasir | finetune s "
          "| estimated Dice left | true Dice left |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
        print(f"| {r['arm']} | {r['corrections']} | {f('effort_wrong')} | {f('effort_1_minus_dice')} | "
              f"{f('test_dice')} | {f('test_dice_object')} | {f('test_empty_right', '{:.2f}')} | {f('base_dice')} | "
              f"{f('polyp_max_change', '{:.1e}')} | {f('polyp_on_domain')} | "
              f"{f('new_on_base')} | "
              f"{f('train_s', '{:.0f}')} | {f('estimated_dice')} | {f('true_dice_left')} |")
    means(rows)
    by_domain(rows)
    timed = [r for r in rows if r.get("timings")]
    if timed:
        print("\n| arm | corrections trained on | finetune s (wall) | where the time went (inside the command) |")
        print("|---|---|---|---|")
        for r in timed:
            print(f"| {r['arm']} | {r.get('trained_on', '-')} | {r['train_s']:.0f} | {r['timings']} |")
    if plot_path:
        plot(rows, plot_path)


def means(rows) -> None:
    """Where an order ran on several pool orders (``--seed``): its mean test Dice and that of
    the images with the object after each round, with the range, and the corrections it needed
    to reach each of name order's Dice values (linear between rounds)."""
    runs: dict = {}
    for r in rows:
        if r["arm"].startswith("order: "):
            order = r["arm"].removeprefix("order: ").split(", pool order")[0]
            runs.setdefault(order, {}).setdefault(r["arm"], []).append(r)
    if not any(len(v) > 1 for v in runs.values()):
        return
    rounds = sorted({r["corrections"] for v in runs.values() for rs in v.values() for r in rs})

    def curve(order, key):
        return np.array([[r[key] for r in sorted(rs, key=lambda r: r["corrections"])] for rs in runs[order].values()])

    print("\n| order | pool orders | mean test Dice after " + " / ".join(map(str, rounds[1:])) + " (lowest-highest) "
          "| mean Dice of images with the object | corrections to reach name order's Dice at each round "
          "| pool orders ahead of name order at each round | corrections to reach name order's Dice of images "
          "with the object |")
    print("|---|---|---|---|---|---|---|")
    name = curve("name", "test_dice").mean(0) if "name" in runs else None
    name_object = curve("name", "test_dice_object").mean(0) if "name" in runs else None
    for order in runs:
        d, o = curve(order, "test_dice"), curve(order, "test_dice_object")
        cells = " / ".join(f"{m:.3f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in zip(d.mean(0)[1:], d.min(0)[1:],
                                                                                 d.max(0)[1:]))
        need = ahead = need_object = "-"
        if name is not None:
            need = " / ".join(_reaches(rounds, d.mean(0), target) for target in name[1:])
            ahead = " / ".join(f"{sum(_ahead(rounds, run, target, k) for run in d)} of {len(d)}"
                               for k, target in enumerate(name[1:], start=1))
            need_object = " / ".join(_reaches(rounds, o.mean(0), target) for target in name_object[1:])
        print(f"| {order} | {len(d)} | {cells} | {' / '.join(f'{m:.3f}' for m in o.mean(0)[1:])} | {need} "
              f"| {ahead} | {need_object} |")


def _tagged(work) -> list[dict]:
    """A run's rows, each with its domain and pool order: runs from before the rows held them
    are named DOMAIN_sSEED or DOMAIN_sSEED_ANYTHING (runs/c41/isic_s0, runs/r41/isic_s1_mine)."""
    rows = json.loads((Path(work) / "results.json").read_text())
    named = re.fullmatch(r"(.+?)_s(\d+)(_.*)?", Path(work).name)
    for r in rows:
        r.setdefault("domain", named.group(1) if named else Path(work).name)
        r.setdefault("pool_order", int(named.group(2)) if named else 0)
    return rows


BASELINES = ("current recipe", "earlier recipe")  # issue 41's two recipes, which a new one must beat


def by_domain(rows) -> None:
    """Where arms ran on several domains: each arm's test Dice after each round per domain (the
    mean over its pool orders), whether every run rose every round, its mean over the domains,
    and its longest round; then, for each arm, issue 41's bar against BASELINES: ahead of both
    of them on the domains' mean after the first and the last round, and on each domain after
    the first round within 0.02 of the better of them."""
    rows = [r for r in rows if "domain" in r and not r["arm"].endswith(": ceiling")]
    domains = sorted({r["domain"] for r in rows})
    if len(domains) < 2:
        return
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    curves: dict = {}  # (arm, domain) -> {pool order: [Dice per round]}
    for r in sorted(rows, key=lambda r: r["corrections"]):
        curves.setdefault((r["arm"], r["domain"]), {}).setdefault(r["pool_order"], []).append(r["test_dice"])
    rounds = sorted({r["corrections"] for r in rows})
    full = [a for a in arms if all((a, d) in curves and all(len(c) == len(rounds) for c in curves[a, d].values())
                                   for d in domains)]  # every round on every domain
    mean = {(a, d): np.mean(list(curves[a, d].values()), axis=0) for a in full for d in domains}
    print(f"\n| domain | arm | pool orders | mean test Dice after {' / '.join(map(str, rounds[1:]))} "
          "| every round rising (runs) | longest round s |")
    print("|---|---|---|---|---|---|")
    for d in domains:
        for a in full:
            runs = curves[a, d].values()
            rising = sum(all(np.diff(c[1:]) > 0) for c in runs)
            longest = max((r["train_s"] for r in rows if (r["arm"], r["domain"]) == (a, d) and "train_s" in r),
                          default=float("nan"))
            print(f"| {d} | {a} | {len(runs)} | {' / '.join(f'{v:.3f}' for v in mean[a, d][1:])} "
                  f"| {rising} of {len(runs)} | {longest:.0f} |")
    print(f"\n| arm | mean over the {len(domains)} domains after {' / '.join(map(str, rounds[1:]))} "
          f"| ahead of {' and '.join(BASELINES)} after the first and the last round "
          "| each domain after the first round within 0.02 of their better |")
    print("|---|---|---|---|")
    overall = {a: np.mean([mean[a, d] for d in domains], axis=0) for a in full}
    baselines = [a for a in BASELINES if a in full]
    for a in full:
        ahead = close = "-"
        if baselines and a not in baselines:
            ahead = all(overall[a][k] > overall[b][k] for b in baselines for k in (1, -1))
            close = all(mean[a, d][1] >= max(mean[b, d][1] for b in baselines) - 0.02 for d in domains)
            ahead, close = ("yes" if ahead else "no"), ("yes" if close else "no")
        print(f"| {a} | {' / '.join(f'{v:.3f}' for v in overall[a][1:])} | {ahead} | {close} |")


def _ahead(rounds, curve, target, k) -> bool:
    """Whether ``curve`` reached ``target`` (name order's Dice after round ``k``) with fewer corrections."""
    reached = _reaches(rounds, curve, target)
    return reached != "not reached" and float(reached) < rounds[k]


def _reaches(rounds, curve, target) -> str:
    """Corrections after which ``curve`` (Dice per round) first reaches ``target``, linear between rounds."""
    for k in range(1, len(rounds)):
        if curve[k] >= target:
            lo = rounds[k - 1] + (rounds[k] - rounds[k - 1]) * (target - curve[k - 1]) / (curve[k] - curve[k - 1])
            return f"{max(lo, rounds[k - 1]):.0f}"
    return "not reached"


def plot(rows, path):
    """One colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    arms = dict.fromkeys(r["arm"] for r in rows if not r["arm"].endswith(": ceiling"))
    for arm, colour in zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        rs = [r for r in rows if r["arm"] == arm]
        x = [r["corrections"] for r in rs]
        axes[0].plot(x, [r["test_dice"] for r in rs], "o-", color=colour, label=arm)
        axes[0].plot(x, [r["base_dice"] for r in rs], "s--", color=colour, label="_")
        for c in (r for r in rows if r["arm"] == f"{arm}: ceiling"):
            axes[0].axhline(c["test_dice"], color=colour, linestyle=":", linewidth=1)
            axes[0].annotate(f"all {c['trained_on']}", (x[-1], c["test_dice"]), color=colour, fontsize=8,
                             xytext=(-28, 3), textcoords="offset points")
        effort = [r for r in rs if "effort_wrong" in r]
        xe = [r["corrections"] for r in effort]
        axes[1].plot(xe, [r["effort_1_minus_dice"] for r in effort], "o-", color=colour, label=arm)
        axes[1].plot(xe, [r["effort_wrong"] for r in effort], "s--", color=colour, label="_")
    axes[0].set(xlabel="corrected masks trained on", ylabel="Dice", ylim=(0, 1),
                title="New domain test Dice (solid; dotted: trained on all), polyp Dice (dashed)")
    axes[1].set(xlabel="corrected masks trained on (before the next 20)", ylabel="share", ylim=(0, 1),
                title="Effort on the next 20: 1 - Dice (solid), wrong pixels (dashed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"Plot: {path}")


if __name__ == "__main__":
    main()
