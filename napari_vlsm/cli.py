"""The ``napari-vlsm`` command line: the core library's jobs, without a GUI."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from napari_vlsm.core.data.prompts import TEXT_TYPES_NAMED, TRAIN_PROMPT_TYPES
from napari_vlsm.core.device import DEVICE_HELP
from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.uncertainty import DEFAULT_SCORE
from napari_vlsm.core.models.train_modes import AUTO_MODE, TRAIN_MODES
from napari_vlsm.core.training.settings import (ROUND_AVERAGE, ROUND_PASSES, ROUND_SIZE, ROUND_STEPS, SCHEDULES,
                                                SMALL_SET, TrainSettings)

app = typer.Typer(help="Text-prompted segmentation of 2D medical images with vision-language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List and fetch models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole
THREADS_HELP = "CPU threads for torch (default: the cores this process may use)."
VAL_DICE_NOTE = ("val Dice is training's own check: at the model's input size, images without the object asked "
                 "for their set's class (so they count against false masks); 'evaluate' scores full-size masks "
                 "with each image's own prompt, and its number differs.")
RECIPE = TrainSettings()  # finetune's defaults and the numbers in its help come from the one recipe

THRESHOLD_HELP = ("Probability at or above which a pixel is the prompt's (default: the model's own, from its "
                  "folder's vlsm_card.json: 0.35 for a converted CRIS, as its benchmark uses; else "
                  f"{DEFAULT_THRESHOLD}).")
MODEL_HELP = ("Model: 'default' (embedded offline model), a local folder (Hugging Face format, or an ONNX export "
              "from export-onnx), or a Hugging Face id.")


def _write_csv(path: Path, rows: list[dict]) -> None:
    """The per-image scores, written atomically; an unwritable path fails with a message."""
    import io

    from napari_vlsm.core.atomic import atomic_write_text

    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    try:
        atomic_write_text(path, text.getvalue())
    except OSError as exc:
        _fail(f"Could not write the scores to {path}: {exc}. Choose another file with --csv.")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False), console=console)


# The core's messages name the library's arguments; shown here, they name the options instead.
FLAGS = {"resume=True": "--resume", "out_dir": "--out", "TrainSettings.repeat": "--repeat", "text_dir=": "--text-tower",
         "encoders=": "--encoders", "prompt=": "--prompt", "model=": "--model", "threshold=": "--threshold"}


def _as_flags(message: str) -> str:
    """A core message with the arguments it names written as this command line's options:
    resume=True as --resume, out_dir as --out, model=M as --model M, prompts=["a", "b"] as
    -p "a" -p "b", and so on."""
    import re

    def prompts(m):
        try:
            return " ".join(f"-p {json.dumps(p)}" for p in json.loads(m.group(1)))
        except ValueError:
            return m.group(0)

    message = re.sub(r"\bprompts=(\[.*?\])(?= with| |$|;|\.)", prompts, message)
    message = message.replace(" with resume=True", " resume=True")  # options in a row, as they are typed
    for name, flag in FLAGS.items():
        if name.endswith("="):  # with a value after it, a space between the option and the value
            message = re.sub(r"\b" + re.escape(name) + r"(?=[^\s).,;:])", flag + " ", message)
        message = re.sub(r"\b" + re.escape(name) + (r"" if name.endswith("=") else r"\b"), flag, message)
    return message


def _fail(message: str, code: int = 2):
    """One line (paths are not wrapped), with the message's brackets shown as written."""
    console.print(f"[red]Error:[/red] {escape(_as_flags(message))}", soft_wrap=True)
    raise typer.Exit(code)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load(spec: str, device: str, dtype: str = "auto"):
    from napari_vlsm.core.errors import VLSMError
    from napari_vlsm.core.models.loading import load_model

    try:
        return load_model(spec, device=device, dtype=dtype)
    except (VLSMError, ImportError, OSError, ValueError) as exc:
        _fail(f"Cannot load model {spec!r}: {exc}")


def _check_model(spec: str) -> None:
    """That a spec names a model folder, without loading it (the workers load it)."""
    from napari_vlsm.core.errors import VLSMError
    from napari_vlsm.core.models.loading import check_safetensors, resolve_folder
    from napari_vlsm.core.file_names import ENCODER_ONNX

    try:
        folder = resolve_folder(spec)
        if not (folder / ENCODER_ONNX).exists():
            check_safetensors(folder)
    except (VLSMError, OSError) as exc:
        _fail(f"Cannot load model {spec!r}: {exc}")


def _dask_session(cluster: str | None, scheduler: str | None, threads: int | None):
    """A Dask session (``core.inference.cluster.connect``) on a new LocalCluster ('local:N') or
    on the scheduler at ``scheduler``, the torch threads of its tasks set by --threads when
    given; a note when a worker was started in an environment that makes it slower."""
    from napari_vlsm.core.inference.cluster import connect, slow_worker_note

    workers = None
    if cluster:
        kind, _, n = cluster.partition(":")
        if kind != "local" or not n.isdigit() or int(n) < 1:
            _fail(f"--cluster is local:N with N worker processes (e.g. local:2), not {cluster!r}.")
        workers = int(n)
    try:
        session = connect(workers, scheduler)
    except ImportError:
        _fail("--cluster and --scheduler need Dask's distributed package: pip install 'napari-vlsm[distributed]'.")
    except (OSError, TimeoutError, ValueError) as exc:
        _fail(f"Cannot reach the Dask scheduler at {scheduler}: {exc}. Start one with 'dask scheduler' and "
              "workers with 'dask worker ADDRESS', or use --cluster local:N.")
    session.threads = threads or session.threads
    note = slow_worker_note(session.client, session.threads)
    if note:
        console.print(f"Note: {escape(_as_flags(note))}", soft_wrap=True)
    return session


def _threshold(threshold: float | None, model: str) -> float:
    """--threshold as given, else the model folder's own (``default_threshold``)."""
    from napari_vlsm.core.inference.folder_labeling import default_threshold

    return default_threshold(model) if threshold is None else threshold


@app.command()
def segment(
    paths: list[Path] = typer.Argument(..., help="Image files or folders (PNG, JPEG, TIFF)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several (label 1, 2, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the masks and labels.json."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help=THRESHOLD_HELP),
    resume: bool = typer.Option(False, help="Go on from an earlier run into --out: the images its report lists as "
                                            "done (with their mask still there) are skipped; same prompts, model "
                                            "and threshold only."),
    fmt: str = typer.Option("png", "--format", help="Mask format: png or tif."),
    batch_size: int = typer.Option(0, help="Images per model call (0: 8 on GPU, 1 on CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    threads: int | None = typer.Option(None, min=1, help=THREADS_HELP),
    cluster: str | None = typer.Option(None, help="local:N: segment on a Dask LocalCluster of N worker processes on "
                                                  "this machine (pip install 'napari-vlsm\\[distributed]')."),
    scheduler: str | None = typer.Option(None, help="Address of a running Dask scheduler (tcp://HOST:8786) whose "
                                                    "workers see --out on a shared filesystem."),
):
    """Segment images with text prompts; one label mask per image."""
    _set_threads(threads)
    from napari_vlsm.core.training.checkpoint import check_writable
    from napari_vlsm.core.errors import VLSMError
    from napari_vlsm.core.inference.folder_labeling import check_resume, describe_held, inputs_in, model_identity
    from napari_vlsm.core.inference.segment_job import segment_folder
    from napari_vlsm.core.images.imageio import list_images
    from napari_vlsm.core.models.model_card import card_for, unknown_words_note
    from napari_vlsm.core.inference.predictor import Predictor, clean_prompts

    if fmt not in ("png", "tif", "tiff"):
        _fail(f"--format must be png or tif, not {fmt!r}.")
    try:
        prompts = clean_prompts(prompt)
    except ValueError as exc:
        _fail(str(exc))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:  # before anything is loaded or written
        _fail(f"No such file or folder: {', '.join(missing)}. Check the path.")
    notes: list[str] = []
    files = list_images(paths, notes)
    for note in notes:
        console.print(f"Note: {escape(note)}", soft_wrap=True)
    if not files:
        _fail("No images found in " + ", ".join(map(str, paths)) + ".")
    held = inputs_in(out, files)
    if held:  # a.png's mask is a.png: it would replace the image
        _fail(f"--out {out} holds the input image {describe_held(held)}: the masks would be written over the "
              f"images. Choose another folder for --out, e.g. {out / 'masks'}.")
    made_by = model_identity(model)  # what labels.json records, and compares with an earlier run's
    threshold = _threshold(threshold, model)
    try:
        check_writable(out, "masks")
        check_resume(out, prompts, made_by, threshold)  # resumed or not: labels.json must describe every mask
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    if cluster and scheduler:
        _fail("Give --cluster local:N or --scheduler ADDRESS, not both.")
    session = predictor = None
    if cluster or scheduler:
        _check_model(model)
        session = _dask_session(cluster, scheduler, threads)
    else:
        backend = _load(model, device, dtype)
        predictor = Predictor(backend)
        batch_size = batch_size or (8 if backend.device.type == "cuda" else 1)
    unknown = unknown_words_note(card_for(model), prompts)
    if unknown:
        console.print(f"Note: {escape(unknown)}", soft_wrap=True)
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    error = None
    try:
        with _progress() as bar:
            task = bar.add_task("Segmenting", total=len(files), info="")
            for res in segment_folder(files, prompts, out, model, threshold, resume, fmt, predictor, batch_size,
                                      session, device, dtype):
                counts[res.status] += 1
                if res.status == "failed":
                    console.print(f"Skipped {escape(str(res.path))}: {escape(res.message)}", soft_wrap=True)
                bar.update(task, advance=1, info=res.path.name)
    except (OSError, RuntimeError, ValueError, VLSMError) as exc:
        error = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror or exc} ({exc.filename or out})"
    finally:
        if session is not None:
            session.close()
    console.print(f"{counts['ok']} segmented, {counts['skipped']} skipped (mask existed), {counts['failed']} failed"
                  f" of {len(files)}. Masks and labels.json in {escape(str(out))}", soft_wrap=True)
    if error:
        _fail(f"Stopped: {error.rstrip('.')}. Masks already written are kept; run again with --resume to go on.")
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
def rank(
    folder: Path = typer.Argument(..., help="Folder of images, or a data set with images/."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the annotators will mark, e.g. 'polyp'."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(Path("ranked.csv"), "--out", "-o", help="CSV of the images, in the order to correct "
                                                                      "them."),
    order: str = typer.Option("kinds", help="kinds (the default, as the image series: the least sure image of "
                                            "each kind of image, for the first --batch; then the most uncertain) or "
                                            "uncertain (the most uncertain first); see docs/corrections.md."),
    batch: int = typer.Option(20, min=1, help="With --order kinds: how many to choose by kind (the corrections you "
                                              "will make before the model is trained again)."),
    score: str = typer.Option(DEFAULT_SCORE, help="Uncertainty score: expected (the default: the pixels the model "
                                                  "expects to get wrong, over its mask's size), prompts (masks of "
                                                  "other phrasings disagree), flip (the mirror's disagrees) or margin "
                                                  "(soft edges); see docs/corrections.md."),
    masks: Path | None = typer.Option(None, help="The image series' mask folder, whose corrections give the "
                                                 "estimate (default: FOLDER/vlsm_masks)."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help=THRESHOLD_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help="auto, fp32, bf16, fp16."),
    threads: int | None = typer.Option(None, min=1, help=THREADS_HELP),
):
    """Rank a folder's images in the order to correct them (by default the least sure image of
    each kind of image first, then the most uncertain), so annotators correct the first and
    `segment` labels the rest; the images an image series marked done go last."""
    _set_threads(threads)
    from napari_vlsm.core.inference.ranking import RANK_ORDERS, rank_images
    from napari_vlsm.core.inference.series import DEFAULT_OUT, estimate_of, read_progress, series_images
    from napari_vlsm.core.inference.uncertainty import SCORES

    if score not in SCORES:
        _fail(f"--score is one of {', '.join(SCORES)}, not {score!r}.")
    if order not in RANK_ORDERS:
        _fail(f"--order is {' or '.join(RANK_ORDERS)}, not {order!r}.")
    if not prompt.strip():
        _fail("Give the prompt to rank by, e.g. -p polyp.")
    threshold = _threshold(threshold, model)
    try:
        images = series_images(folder)
    except OSError as exc:
        _fail(str(exc))
    progress = read_progress(masks or folder / DEFAULT_OUT)
    backend = _load(model, device, dtype)
    rows, failed = [], False
    try:
        with _progress() as bar:
            task = bar.add_task("Scoring", total=len(images), info="")
            for ev in rank_images(backend, images, prompt, order, batch, score, progress.get("done", []), threshold):
                if ev.error:
                    failed = True
                    console.print(f"Skipped {escape(str(ev.path))}: {escape(ev.error)}", soft_wrap=True)
                if ev.kind == "done":
                    rows = ev.rows
                else:
                    bar.update(task, completed=ev.seen, info=ev.path.name)
    except ValueError as exc:
        _fail(str(exc))
    _write_csv(out, rows)
    todo = [r for r in rows if not r["done"]]
    first = f"the least sure image of each kind of image for the first {min(batch, len(todo))} (one in four " \
            f"drawn at random instead, to check the model on: column chosen), then the most uncertain by {score}" \
        if order == "kinds" else f"the most uncertain by {score} first"
    console.print(f"{len(rows)} images ranked ({len(todo)} not yet corrected): {first}, in {escape(str(out))}.",
                  soft_wrap=True)
    for r in todo[:5]:
        console.print(f"  {r['rank']}. {escape(Path(r['image']).name)}  {score} {r['score']:.3f}", soft_wrap=True)
    estimate, drawn = estimate_of(progress)
    if estimate is not None:
        on = (f"the series' last {drawn} correction{'s' * (drawn > 1)} of images drawn at random" if drawn else
              "the series' last corrections, low where it handed out the least sure images first")
        console.print(f"Estimated Dice on the images not yet corrected: {estimate:.2f} (how well the proposals "
                      f"agreed with {on}; if that is good enough, label the rest with napari-vlsm segment).",
                      soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    data_dir: Path = typer.Argument(..., help="Folder in the benchmark's format (images/, masks/, anns/)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    prompt_type: str = typer.Option("p1", help=f"Benchmark prompt type, {TEXT_TYPES_NAMED}."),
    split: str = typer.Option("val", help="Which anns/<split>.json to score: val, test or train."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help=THRESHOLD_HELP),
    csv_out: Path | None = typer.Option(None, "--csv",
                                           help="Per-image CSV (default: evaluation_<folder>_<split>_<type>.csv)."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N images."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help="auto, fp32, bf16, fp16."),
    threads: int | None = typer.Option(None, min=1, help=THREADS_HELP),
    cluster: str | None = typer.Option(None, help="local:N: score on a Dask LocalCluster of N worker processes on "
                                                  "this machine (pip install 'napari-vlsm\\[distributed]')."),
    scheduler: str | None = typer.Option(None, help="Address of a running Dask scheduler (tcp://HOST:8786) whose "
                                                    "workers see DATA_DIR under the same path."),
):
    """Mean Dice and IoU against the ground-truth masks (on one process or a Dask cluster: the
    same prompts, the same scores)."""
    _set_threads(threads)
    from napari_vlsm.core.inference.evaluate import evaluate as run_eval
    from napari_vlsm.core.inference.evaluate import summarize
    from napari_vlsm.core.inference.predictor import Predictor

    if prompt_type not in TRAIN_PROMPT_TYPES:
        _fail(f"--prompt-type must be one of {TEXT_TYPES_NAMED} (p0 is the empty prompt), not {prompt_type!r}.")
    if not (data_dir / "anns" / f"{split}.json").exists():
        _fail(f"{data_dir} has no anns/{split}.json: expected the benchmark's layout (images/, masks/, anns/).")
    if cluster and scheduler:
        _fail("Give --cluster local:N or --scheduler ADDRESS, not both.")
    threshold = _threshold(threshold, model)
    session = None
    if cluster or scheduler:
        _check_model(model)
        session = _dask_session(cluster, scheduler, threads)
    else:
        predictor = Predictor(_load(model, device, dtype))
    rows = []
    from napari_vlsm.core.data.prompts import load_annotations

    try:
        n = len(load_annotations(data_dir / "anns" / f"{split}.json"))
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    if n == 0:
        _fail(f"{data_dir / 'anns' / (split + '.json')} lists no images; nothing to evaluate.")
    try:
        with _progress() as bar:
            task = bar.add_task("Evaluating", total=min(n, limit or n), info="")
            if session is not None:
                from napari_vlsm.core.inference.cluster import evaluate_on_cluster

                scored = evaluate_on_cluster(session.client, model, data_dir, prompt_type, split, threshold,
                                             limit=limit, device=device, dtype=dtype, threads=session.threads)
            else:
                scored = run_eval(predictor, data_dir, prompt_type, split, threshold, limit=limit)
            for row in scored:
                rows.append(row)
                bar.update(task, advance=1, info=f"Dice {summarize(rows)['dice']:.3f}")
    except (ValueError, OSError, RuntimeError) as exc:
        _fail(str(exc))
    finally:
        if session is not None:
            session.close()
    if not rows:
        _fail(f"No images were evaluated in {data_dir} ({split}).")
    summary = summarize(rows)
    table = Table(title=escape(f"{data_dir.name} / {split} / {prompt_type}"),
                  caption=f"full-size masks, each image asked with its own {prompt_type} prompt")
    for col in ("images", "mean Dice", "mean IoU"):
        table.add_column(col, justify="right")
    table.add_row(str(summary["n"]), f"{summary['dice']:.4f}", f"{summary['iou']:.4f}")
    Console().print(table)  # before the file, so the scores are seen even when it cannot be written
    csv_out = csv_out or Path(f"evaluation_{data_dir.name}_{split}_{prompt_type}.csv")
    _write_csv(csv_out, rows)
    console.print(f"Per-image scores in {escape(str(csv_out))}", soft_wrap=True)


@models_app.callback()
def models(ctx: typer.Context, folders: list[Path] = typer.Option([], "--folder", help="Also check these folders.")):
    """List the models found: the embedded default, the HF cache, and folders given."""
    if ctx.invoked_subcommand:
        return
    from napari_vlsm.core.models.registry import find_models

    table = Table(title="Models")
    for col in ("spec", "kind", "where"):
        table.add_column(col)
    for m in find_models(folders):
        table.add_row(escape(m.spec), m.kind, escape(m.where))
    Console().print(table)


@models_app.command("families")
def models_families():
    """The model families napari-vlsm runs: what each trains and how a fresh one starts."""
    from napari_vlsm.core.models.families import families

    table = Table(title="Model families")
    for col in ("family", "model_type", "training modes", "correction adapters", "fresh start"):
        table.add_column(col)
    for f in families():
        fresh = f"{f.new_spec}: {_as_flags(f.new_help)}" if f.new_spec else "-"
        table.add_row(f.name, f.model_type, ", ".join(f.train_modes), "yes" if f.adapters else "no", fresh)
    Console().print(table)


@models_app.command("pull")
def models_pull(model_id: str = typer.Argument(..., help="Hugging Face id, e.g. CIDAS/clipseg-rd64-refined or "
                                                          "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
                out: Path | None = typer.Option(None, help="For open_clip models: where the converted "
                                                              "BiomedCLIPSeg folder goes.")):
    """Download a model (needs internet). BiomedCLIP's open_clip files are converted once to a
    BiomedCLIPSeg folder in safetensors, with a new decoder to finetune."""
    from napari_vlsm.core.errors import VLSMError
    from napari_vlsm.core.models.registry import pull

    try:
        path = pull(model_id, out)
    except VLSMError as exc:  # downloaded, but not convertible
        _fail(str(exc))
    except Exception as exc:
        _fail(f"Could not download {model_id}: {exc}")
    console.print(escape(f"{model_id} is in {path}"), soft_wrap=True)


@models_app.command("convert")
def models_convert(folder: Path = typer.Argument(..., help="open_clip files: open_clip_config.json and weights."),
                   out: Path = typer.Option(..., "--out", "-o", help="New folder for the BiomedCLIPSeg model."),
                   text_tower: Path | None = typer.Option(None, help="The text tower's config.json and vocab.txt "
                                                                        "(default: beside the open_clip files, or "
                                                                        "the Hugging Face cache)."),
                   seed: int = typer.Option(0, help="Seed of the new decoder's random weights.")):
    """Turn BiomedCLIP's open_clip files into a BiomedCLIPSeg model folder (safetensors; its
    pickled weights are read once with torch.load(weights_only=True)). The decoder is new:
    finetune the folder before segmenting with it."""
    from napari_vlsm.core.errors import VLSMError
    from napari_vlsm.core.models.biomedclipseg.convert import convert

    try:
        path = convert(folder, out, text_dir=text_tower, seed=seed)
    except (VLSMError, OSError, ValueError) as exc:
        _fail(str(exc))
    console.print(escape(f"BiomedCLIPSeg model written to {path}. Its decoder is untrained: finetune it, e.g. "
                         f"napari-vlsm finetune DATA --model {path} --out RUN"), soft_wrap=True)


@models_app.command("convert-cris")
def models_convert_cris(checkpoint: Path = typer.Argument(..., help="A CRIS release checkpoint (a torch.save of "
                                                                     "{'state_dict': ...}, e.g. best_model.pth)."),
                        out: Path = typer.Option(..., "--out", "-o", help="New folder for the CRIS model."),
                        image_size: int = typer.Option(416, help="Input side the checkpoint was trained at."),
                        padding: str | None = typer.Option(
                            None, help="How its prompts were padded in training: zero (CRIS.pytorch's) or eot "
                                       "(the medvlsm benchmark's <|endoftext|>, not masked). Default: what the "
                                       "file tells: eot for net. keys (the benchmark's Lightning module), else zero."),
                        threshold: float | None = typer.Option(
                            None, min=0.0, max=1.0, help="Threshold the folder asks for (default: the checkpoint's "
                                                         "own, else the benchmark's 0.35).")):
    """Turn a CRIS checkpoint (CRIS.pytorch's release, medvlsm's cris_best_single.pth or a
    checkpoint of the benchmark's CRIS finetuning) into a CRIS model folder (safetensors). The
    file is read with tensors only: nothing in it is run, and a pickle whose weights hold code
    is refused."""
    from napari_vlsm.core.errors import VLSMError
    from napari_vlsm.core.inference.folder_labeling import default_threshold
    from napari_vlsm.core.models.cris.convert import convert_cris_checkpoint
    from napari_vlsm.core.models.cris.model import TEXT_PADDINGS, CrisConfig
    from napari_vlsm.core.models.model_card import read_card

    if padding is not None and padding not in TEXT_PADDINGS:
        _fail(f"--padding is {' or '.join(TEXT_PADDINGS)}, not {padding!r}.")
    try:
        path = convert_cris_checkpoint(checkpoint, out, text_padding=padding, threshold=threshold,
                                       image_size=image_size)
    except (VLSMError, OSError, ValueError) as exc:
        _fail(str(exc))
    source = read_card(path).get("converted_from", {})
    padded = {"zero": "padded with 0 and masked out, as CRIS.pytorch does",
              "eot": "padded with <|endoftext|> and not masked, as the medvlsm benchmark does"}
    how = padded[CrisConfig.from_pretrained(path).text_padding]
    why = "--padding" if padding else "from its keys"
    console.print(escape(f"Trained by {source.get('trained_by', '?')}: prompts are read {how} ({why}); "
                         f"threshold {default_threshold(path)} (from {_as_flags(str(source.get('threshold_from')))})."),
                  soft_wrap=True)
    console.print(escape(f"CRIS model written to {path}. Segment with it (--model {path}) or finetune it: "
                         f"napari-vlsm finetune DATA --model {path} --out RUN"), soft_wrap=True)


@app.command()
def finetune(
    data: list[Path] = typer.Argument(...,
                                      help="Training folders: benchmark layout, or images/ + masks/ with --prompt."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder (best/ and last/ inside)."),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP + " 'new:FAMILY' starts a fresh model "
                                     "('napari-vlsm models families' lists them). Default: 'default'; with "
                                     "--resume, the run's own."),
    encoders: Path | None = typer.Option(None, help="For a new:FAMILY that starts from pretrained encoders "
                                                       "(new:biomedclipseg: BiomedCLIP's open_clip folder, see "
                                                       "'models pull', or a BiomedCLIPSeg model folder)."),
    train_mode: str = typer.Option(RECIPE.mode, "--train",
                                   help=f"{AUTO_MODE} (the model's own: full for the FiLM-UNet, decoder for CLIPSeg), "
                                        f"{', '.join(TRAIN_MODES[:-1])} or {TRAIN_MODES[-1]}."),
    epochs: int | None = typer.Option(RECIPE.epochs, min=1, help="Default: enough epochs for --steps steps."),
    steps: int | None = typer.Option(RECIPE.steps, min=1, help=f"Optimiser steps of the round (default: {ROUND_STEPS} "
                                     f"up to {ROUND_SIZE} examples, then {ROUND_PASSES} draws "
                                     "of each)."),
    lr: float | None = typer.Option(RECIPE.lr, help="Learning rate (default: the model's own for the mode)."),
    batch_size: int = typer.Option(RECIPE.batch_size, min=1),
    val_split: str = typer.Option("val", help="Use anns/<this>.json as validation where it exists."),
    val_fraction: float | None = typer.Option(
        RECIPE.val_fraction, min=0.0, max=0.9,
        help=f"Otherwise hold out this share (default: none below {SMALL_SET} examples, else {RECIPE.holdout(SMALL_SET)})."),
    replay_fraction: float | None = typer.Option(
        RECIPE.replay_fraction, min=0.0, max=0.9,
        help=f"Share of each batch from the model's replay sample, if it has one (default: {RECIPE.replay_share(None)}; "
             f"{RECIPE.replay_share(1)} for an adapter, which sees them as negatives)."),
    encoder_lr_scale: float = typer.Option(RECIPE.encoder_lr_scale, min=0.0,
                                           help="Image encoder's learning rate relative to the rest."),
    new_share: float = typer.Option(RECIPE.new_share, min=0.0, max=0.95, help="In a round that continues a model "
                                    "trained on part of the set, the share of draws from the corrections new to it "
                                    "(0: each as often as the others)."),
    frozen_levels: int | None = typer.Option(RECIPE.frozen_levels, min=0, max=5, help="FiLM-UNet: image-encoder levels, "
                                             "counted from the input, that stay as they are (default: 3 on the "
                                             "pretrained encoder, else 0)."),
    anchor: float = typer.Option(RECIPE.anchor, min=0.0, help="L2 pull toward the starting weights (keeps what it knew)."),
    adapters: str = typer.Option(RECIPE.adapters, help="auto: a class new to a trained FiLM-UNet is learned on an adapter "
                                              "of its own, the base unchanged; off: one shared network."),
    prompt: str | None = typer.Option(None, help="Prompt for plain image/mask folders."),
    negative_prompt: list[str] = typer.Option([], help="Prompt of something absent: trained to give an empty mask."),
    negatives_file: Path | None = typer.Option(None, help="File of such prompts, one per line (# comments)."),
    negative_fraction: float = typer.Option(RECIPE.negative_fraction, min=0.0, max=1.0,
                                            help="Share of each batch also decoded with a negative prompt."),
    empty_tolerance: float = typer.Option(RECIPE.empty_tolerance, min=0.0, max=0.5,
                                          help="On an empty target, the Dice term forgives this share of the "
                                               "image (a rare target learns to answer; 0: none)."),
    synonyms: Path | None = typer.Option(None, help="JSON {data folder name: \\[extra prompts]} such as "
                                                       "\"breast tumor\", trained like the folder's own prompts."),
    repeat: list[str] = typer.Option([], help="FOLDER=N: draw that training folder's examples N times an "
                                              "epoch (oversample a small set of a pooled run)."),
    crop: int | None = typer.Option(
        RECIPE.crop, min=0,
        help="Random crops of this side (default: the model's own, 160 for the FiLM-UNet; 0: none)."),
    schedule: str = typer.Option(RECIPE.schedule, help="onecycle or plateau."),
    weight_average: float | None = typer.Option(
        RECIPE.weight_average, min=0.0, max=0.9999, help="Decay of a moving average of the weights, which is validated "
                                                         f"and saved instead of the last step's weights (default: "
                                                         f"{ROUND_AVERAGE}; 0: off)."),
    guidance_share: float = typer.Option(
        RECIPE.guidance_share, min=0.0, max=1.0, help="A model that takes clicks: share of the images showing their "
                                                      "object trained with simulated clicks or a box (0: text only)."),
    click_iterations: int = typer.Option(RECIPE.click_iterations, min=0,
                                         help="At most this many corrective clicks simulated per image."),
    patience: int = typer.Option(RECIPE.patience),
    seed: int = typer.Option(RECIPE.seed),
    threads: int | None = typer.Option(RECIPE.threads, min=1, help=THREADS_HELP),
    resume: bool = typer.Option(False, help="Continue from OUT/last."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Finetune a model on image/mask pairs; resumable; runs under torchrun for several GPUs."""
    from napari_vlsm.core.training.adapters import ADAPTER_MODES
    from napari_vlsm.core.errors import TrainingError, VLSMError
    from napari_vlsm.core.training.distributed import init_distributed
    from napari_vlsm.core.training.train import finetune as run_finetune

    if adapters not in ADAPTER_MODES:
        _fail(f"--adapters is {' or '.join(ADAPTER_MODES)}, not {adapters!r}.")
    if encoders is not None and not (model or "").startswith("new:"):
        _fail("--encoders goes with a fresh model such as --model new:biomedclipseg (a new decoder on those "
              f"encoders); --model {model} brings its own.")
    if schedule not in SCHEDULES:
        _fail(f"--schedule is {' or '.join(SCHEDULES)}, not {schedule!r}.")
    distributed = init_distributed()
    negatives = list(negative_prompt) + (_read_lines(negatives_file) if negatives_file else [])
    settings = TrainSettings(mode=train_mode, epochs=epochs, steps=steps, frozen_levels=frozen_levels,
                             new_share=new_share, lr=lr, batch_size=batch_size, val_fraction=val_fraction,
                             negative_prompts=negatives, negative_fraction=negative_fraction,
                             empty_tolerance=empty_tolerance,
                             synonyms=_read_synonyms(synonyms) if synonyms else {}, repeat=_read_repeats(repeat),
                             crop=crop, schedule=schedule, weight_average=weight_average,
                             replay_fraction=replay_fraction, encoder_lr_scale=encoder_lr_scale, anchor=anchor,
                             adapters=adapters, guidance_share=guidance_share, click_iterations=click_iterations,
                             patience=patience, seed=seed, threads=threads)
    meta = {"command": "napari-vlsm " + " ".join(sys.argv[1:])}
    rank0 = not distributed or __import__("torch").distributed.get_rank() == 0
    try:
        with _progress() as bar:
            task = bar.add_task("Training", total=None, info="", visible=rank0)
            for ev in run_finetune(model, data, out, settings, resume=resume, prompt=prompt, val_split=val_split,
                                   device=device, metadata=meta, encoders=encoders):
                bar.update(task, total=ev.steps, completed=ev.step,
                           info=f"epoch {ev.epoch}/{ev.epochs} loss {ev.loss:.3f}"
                                + (f" best Dice {ev.best_dice:.3f}" if ev.best_dice is not None else ""))
                if ev.kind == "epoch" and rank0:
                    if ev.epoch == 1 and ev.val_dice is not None:
                        console.print(VAL_DICE_NOTE, soft_wrap=True)
                    val = f"{ev.val_dice:.4f}" if ev.val_dice is not None else "-"
                    console.print(f"epoch {ev.epoch}: loss {ev.loss:.4f}  val Dice {val}  "
                                  f"{ev.images_per_s:.1f} img/s" + ("  (saved best)" if ev.checkpoint else ""))
                    if ev.val_by_set:
                        console.print("  " + "  ".join(f"{k} {v:.3f}" for k, v in ev.val_by_set.items()))
                if ev.kind == "done":  # an early stop ends the bar where it stopped, with nothing remaining
                    bar.update(task, total=ev.step, completed=ev.step)
                if ev.kind == "done" and rank0:
                    console.print(escape(f"{ev.message}\nBest model: {ev.checkpoint}"), soft_wrap=True)
                    if ev.timings:
                        console.print("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in ev.timings.items()),
                                      soft_wrap=True)
    except (TrainingError, VLSMError, OSError, ValueError, ImportError) as exc:
        _fail(str(exc))
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _read_synonyms(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _fail(f"Cannot read the synonyms file {path}: {exc}")
    if not isinstance(table, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                              for v in table.values()):
        _fail(f"{path} must hold a JSON object: data folder name -> list of prompts.")
    return table


def _read_repeats(items: list[str]) -> dict:
    table = {}
    for item in items:
        name, _, times = item.partition("=")
        if not name or not times.isdigit():
            _fail(f"--repeat {item!r}: write FOLDER=N, e.g. --repeat busi=2.")
        table[name] = int(times)
    return table


def _read_lines(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        _fail(f"Cannot read {path}: {exc}")
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


@app.command("export-onnx")
def export_onnx(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out_dir: Path = typer.Argument(..., help="Folder for image_encoder.onnx and prompt_decoder.onnx: "
                                                       "new or empty, or an earlier export (replaced whole)."),
    opset: int = typer.Option(18),
):
    """Export a model to two ONNX graphs (image encoder, prompt decoder) for onnxruntime."""
    from napari_vlsm.core.training.checkpoint import check_writable
    from napari_vlsm.core.models.onnx_export import export, target_problem

    try:
        import onnx  # noqa: F401  (the exporter needs it; say how to get it)
    except ImportError:
        _fail("Exporting needs the onnx packages: pip install 'napari-vlsm[onnx]' (or [gpu] for onnxruntime-gpu).")
    try:
        problem = target_problem(out_dir)
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    if problem:  # before the model is loaded; nothing there is changed
        _fail(f"{out_dir} {problem}. Choose a new or empty folder, or an earlier export to replace.")
    try:
        check_writable(out_dir, "the ONNX model")
    except OSError as exc:
        _fail(str(exc))
    backend = _load(model, "cpu", "fp32")
    try:
        paths = export(backend, out_dir, opset=opset)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
    console.print(escape("Wrote " + ", ".join(str(p) for p in paths)), soft_wrap=True)


@app.command()
def demo(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(Path("vlsm_demo"), "--out", "-o", help="Folder for the mask and screenshot."),
    headless: bool = typer.Option(False, help="Do not open a window even if there is a display."),
):
    """Open a sample colonoscopy frame and segment it with the offline model (headless: files)."""
    from napari_vlsm.core.errors import VLSMError
    from .demo import run

    try:
        paths = run(model, out, headless)
    except VLSMError as exc:
        _fail(str(exc))
    for p in paths:
        console.print(escape(f"Wrote {p.resolve()}"), soft_wrap=True)


def main():
    app()


if __name__ == "__main__":
    main()
