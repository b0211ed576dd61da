"""The replay sample: a few of a model's own training pairs, kept in its folder.

Finetuning on a handful of corrections from a new domain overwrites what a small model
knew (the polyp Dice of the base model fell from 0.80 to 0.36 after one such round). A
model folder may hold ``replay/``, a small fixed sample of the data it was trained on, in
the benchmark layout with each entry's data set in ``group``. Finetuning mixes these pairs
into every batch, so the old prompts keep being asked and answered while the new ones are
learned, and copies the folder into each checkpoint, so a chain of rounds keeps it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from napari_vlsm.core.data.prompts import load_annotations
from napari_vlsm.core.data.training_sets import Example, benchmark_examples, row_targets

REPLAY_DIR = "replay"


def replay_dir(model_folder) -> Path | None:
    """The model's replay folder, or None when it has none."""
    if model_folder is None:
        return None
    folder = Path(model_folder) / REPLAY_DIR
    return folder if (folder / "anns" / "train.json").exists() else None


def replay_examples(folder) -> list[Example]:
    """The pairs of a replay folder, each with the data set it was drawn from as its group."""
    folder = Path(folder)
    entries = load_annotations(folder / "anns" / "train.json")
    examples = benchmark_examples(folder, "train")
    for ex, entry in zip(examples, entries):
        ex.group = entry.get("group", ex.group)
        ex.target = entry.get("target", "")
    return examples


def write_replay_sample(data_dirs, model_folder, per_set: int = 24, seed: int = 0) -> Path:
    """Copy ``per_set`` training pairs of each benchmark-format folder (files as they are,
    prompts and all) into ``model_folder/replay``; return that folder."""
    out = Path(model_folder) / REPLAY_DIR
    if out.exists():
        shutil.rmtree(out)
    entries = []
    for data_dir in map(Path, data_dirs):
        rows = load_annotations(data_dir / "anns" / "train.json")
        rows = [{**row, "target": target} for row, target in zip(rows, row_targets(rows))]
        for row in random.Random(seed).sample(rows, min(per_set, len(rows))):
            row = {**row, "img_name": f"{data_dir.name}__{row['img_name']}",
                   "mask_name": f"{data_dir.name}__{row['mask_name']}", "group": data_dir.name}
            for sub, key in (("images", "img_name"), ("masks", "mask_name")):
                (out / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(data_dir / sub / row[key].split("__", 1)[1], out / sub / row[key])
            entries.append(row)
    (out / "anns").mkdir(parents=True, exist_ok=True)
    (out / "anns" / "train.json").write_text(json.dumps(entries, indent=1))
    return out
