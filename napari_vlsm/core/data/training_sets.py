"""Training examples: (image, mask, prompt) from the benchmark's folders, from plain
image/mask folders, or from arrays (napari layers).

The on-disk training-set format is the benchmark's own (``images/``, ``masks/``,
``anns/<split>.json``), so an example set collected in napari is also an evaluation set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from napari_vlsm.core.images.imageio import IMAGE_SUFFIXES, MASK_SUFFIXES, flatten_mask, read_image, read_mask
from napari_vlsm.core.images.preprocess import to_rgb8
from napari_vlsm.core.data.prompts import TRAIN_PROMPT_TYPES, load_annotations, pick_prompt  # noqa: F401



@dataclass
class Example:
    """One training pair. ``image``/``mask`` are arrays or paths (read when needed).
    ``prompts`` maps prompt type -> text (or list of texts); ``label`` picks the mask value
    that is foreground (None: every non-zero value). ``group`` names the data set it came
    from (its folder), for per-set validation scores and cross-set negative prompts.
    ``target`` names the class within a folder that annotates several on the same images
    (chest X-rays: the lungs and the infection), "" otherwise."""

    image: object
    mask: object
    prompts: dict = field(default_factory=dict)
    label: int | None = None
    name: str = ""
    group: str = ""
    target: str = ""

    @property
    def kind(self) -> str:
        """The data set and, in a folder of several targets, the target: what validation scores
        and what a concept (the class its prompts ask for) belongs to."""
        return f"{self.group}{KIND_SEPARATOR}{self.target}" if self.target else self.group

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.image) if isinstance(self.image, (str, Path)) else np.asarray(self.image)
        mask = read_mask(self.mask) if isinstance(self.mask, (str, Path)) else flatten_mask(self.mask)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{self.name or 'example'}: mask shape {mask.shape} differs from image "
                             f"shape {image.shape[:2]}; masks must cover the image pixel for pixel.")
        fg = mask != 0 if self.label is None else mask == self.label
        return to_rgb8(image), fg

    def prompt(self, types, rng: random.Random) -> str:
        usable = [t for t in types if self.prompts.get(t)] or [t for t, v in self.prompts.items() if v]
        if not usable:
            raise ValueError(f"{self.name or 'example'} has no prompt.")
        return pick_prompt({"prompts": self.prompts}, rng.choice(usable), rng)


KIND_SEPARATOR = ":"


def folder_of_kind(kind: str) -> str:
    return kind.split(KIND_SEPARATOR, 1)[0]


def row_targets(rows: list[dict]) -> list[str]:
    """Each row's target where an image is annotated in several rows with different masks (one
    per target, as chest_xray's lungs and infection): its p1, case-folded; "" for every row otherwise."""
    masks: dict = {}
    for r in rows:
        masks.setdefault(r.get("img_name"), set()).add(r.get("mask_name"))
    if all(len(m) == 1 for m in masks.values()):  # a row repeated (BKAI-IGH has one) is not a second target
        return [""] * len(rows)
    return [str(r.get("prompts", {}).get("p1", "")).strip().casefold() for r in rows]


def benchmark_examples(data_dir, split: str = "train") -> list[Example]:
    """Examples of a folder in the benchmark's format (images/, masks/, anns/<split>.json)."""
    data_dir = Path(data_dir)
    ann = data_dir / "anns" / f"{split}.json"
    if not ann.exists():
        raise FileNotFoundError(f"{data_dir} has no anns/{split}.json; expected the benchmark's layout "
                                "(images/, masks/, anns/<split>.json).")
    rows = load_annotations(ann)
    return [Example(data_dir / "images" / e["img_name"], data_dir / "masks" / e["mask_name"],
                    dict(e.get("prompts", {})), e.get("label"), e["img_name"], data_dir.name, target)
            for e, target in zip(rows, row_targets(rows))]


def folder_examples(data_dir, prompt: str) -> list[Example]:
    """Examples from ``images/`` and ``masks/`` sub-folders paired by file stem, all with ``prompt``."""
    data_dir = Path(data_dir)
    masks = {p.stem: p for p in (data_dir / "masks").glob("*") if p.suffix.lower() in MASK_SUFFIXES}
    images = sorted(p for p in (data_dir / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Example(p, masks[p.stem], {"p1": prompt}, None, p.name, data_dir.name)
            for p in images if p.stem in masks]


def load_examples(data_dir, split: str = "train", prompt: str | None = None) -> list[Example]:
    """Benchmark layout if ``anns/<split>.json`` exists, else image/mask folders with ``prompt``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"No data folder at {data_dir}.")
    if (data_dir / "anns" / f"{split}.json").exists():
        return benchmark_examples(data_dir, split)
    if prompt is None:
        raise ValueError(f"{data_dir} has no anns/{split}.json; give the prompt for its masks (prompt=).")
    return folder_examples(data_dir, prompt)


def split_examples(examples: list[Example], val_fraction: float, seed: int = 0):
    """Shuffle with ``seed`` and split into (train, val); at least one of each when possible."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    n_val = int(round(len(items) * val_fraction))
    if val_fraction > 0 and len(items) > 1:
        n_val = min(max(n_val, 1), len(items) - 1)
    return items[n_val:], items[:n_val]


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, mask nearest, to ``size`` (H, W)."""
    if image.shape[:2] == tuple(size):
        return image, mask
    hw = (size[1], size[0])
    im = np.asarray(Image.fromarray(image).resize(hw, Image.BILINEAR))
    mk = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(hw, Image.NEAREST)) > 127
    return im, mk


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """Flips, 90-degree turns, a small random scale/shift (a crop of 85-100% resized back),
    brightness/contrast jitter."""
    h, w = mask.shape
    if rng.random() < 0.5:
        s = rng.uniform(0.85, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image, mask = resize_pair(image[y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw], (h, w))
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    k = int(rng.integers(0, 4))
    if k and h == w:
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.8:
        gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
        image = np.clip(image.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class PairCache:
    """Images and masks loaded once and resized to the model's input size (an example that
    appears several times in the list, oversampled, is loaded once)."""

    def __init__(self, examples: list[Example], size: tuple[int, int]):
        self.examples = examples
        self.size = size
        self._items: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def load_all(self) -> None:
        for i in range(len(self.examples)):
            self[i]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        key = id(self.examples[i])
        if key not in self._items:
            self._items[key] = resize_pair(*self.examples[i].load(), self.size)
        return self._items[key]


def write_benchmark_example(folder, name: str, image: np.ndarray, mask: np.ndarray, prompt: str,
                            split: str = "train") -> dict:
    """Add one (image, mask, prompt) to a training-set folder in the benchmark's format, in
    place of an example of the same ``name`` (the same image stored again after an edit).
    The image is stored losslessly (PNG, or TIFF for non-8-bit data); the index is
    rewritten atomically so an interrupted write loses nothing already stored."""
    from napari_vlsm.core.images.imageio import write_image, write_mask

    folder = Path(folder)
    image = np.asarray(image)
    img_suffix = ".png" if image.dtype == np.uint8 and image.ndim in (2, 3) and \
        (image.ndim == 2 or image.shape[-1] in (3, 4)) else ".tif"
    img_path = folder / "images" / f"{name}{img_suffix}"
    mask_path = folder / "masks" / f"{name}.png"
    write_mask(mask_path, np.asarray(mask).astype(bool).astype(np.uint8) * 255)
    write_image(img_path, image)
    earlier = read_index(folder, split)
    entries = [e for e in earlier if e["mask_name"] != mask_path.name]
    entry = {"img_name": img_path.name, "mask_name": mask_path.name, "cat": 0, "prompts": {"p1": prompt}}
    write_index(folder, entries + [entry], split)
    for e in earlier:
        if e["mask_name"] == mask_path.name and e["img_name"] != img_path.name:  # stored as PNG before, TIFF now
            _delete_inside(folder / "images", e["img_name"])
    return entry


def _delete_inside(sub: Path, name: str) -> None:
    """Delete ``sub/name``, never a file outside ``sub`` (a name from an index could be '../x')."""
    path = (sub / name).resolve()
    if path.parent == sub.resolve():
        path.unlink(missing_ok=True)


def remove_label_examples(folder, stem: str, keep: list[int], split: str = "train") -> None:
    """Drop the examples ``{stem}-{value}`` (one image's labels, as the image series names them)
    whose value is not in ``keep``: a label cleared since it was stored."""
    folder = Path(folder)
    entries = read_index(folder, split)
    prefix = f"{stem}-"

    def stale(e) -> bool:
        value = Path(e["mask_name"]).stem[len(prefix):]
        return e["mask_name"].startswith(prefix) and value.isdigit() and int(value) not in keep

    gone = [e for e in entries if stale(e)]
    if gone:
        write_index(folder, [e for e in entries if not stale(e)], split)
        for e in gone:
            _delete_inside(folder / "images", e["img_name"])
            _delete_inside(folder / "masks", e["mask_name"])


def read_index(folder, split: str = "train") -> list[dict]:
    path = Path(folder) / "anns" / f"{split}.json"
    return load_annotations(path) if path.exists() else []


def write_index(folder, entries: list[dict], split: str = "train") -> None:
    from napari_vlsm.core.atomic import atomic_write_text

    atomic_write_text(Path(folder) / "anns" / f"{split}.json", json.dumps(entries, indent=1))


def remove_example(folder, img_name: str, split: str = "train") -> None:
    """Drop one example from the index and delete its files."""
    folder = Path(folder)
    entries = read_index(folder, split)
    keep = [e for e in entries if e["img_name"] != img_name]
    write_index(folder, keep, split)
    for e in entries:
        if e["img_name"] == img_name:
            for sub, key in (("images", "img_name"), ("masks", "mask_name")):
                _delete_inside(folder / sub, e[key])
