"""The benchmark's attribute prompts (Poudel et al.) and its annotation files.

Prompt types, for a polyp (see ../shared/data/README.md):

    p0 ""                                    p1 "polyp"
    p2 "circle polyp"                        p3 "pink circle polyp"
    p4 "small pink circle polyp"             p5 "one small pink circle polyp"
    p6 "one small pink circle polyp, located in right of the image"
    p7 "polyp which is <description>"        p8 "one small pink circle polyp which is <description>"
    p9 "one small pink circle polyp which is <description> located in right of the image"
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPT_TYPES = tuple(f"p{i}" for i in range(10))  # p0 is the empty prompt
TRAIN_PROMPT_TYPES = PROMPT_TYPES[1:]  # p1-p9: the benchmark's nine types with text, trained and evaluated
TEXT_TYPES_NAMED = f"{TRAIN_PROMPT_TYPES[0]} to {TRAIN_PROMPT_TYPES[-1]}"  # for messages and help
SYNONYM_TYPE = "syn"  # short forms a person would type, added for training (finetune --synonyms)
ATTRIBUTES = ("number", "size", "colour", "shape", "class", "location", "description")
# choices offered by the widget's prompt builder; the benchmark's own values among them
CHOICES = {
    "number": ["", "one", "two", "three", "many"],
    "size": ["", "small", "medium", "large"],
    "colour": ["", "pink", "red", "white", "yellow", "brown", "dark", "bright"],
    "shape": ["", "circle", "oval", "round", "irregular"],
    "location": ["", "center", "left", "right", "top", "bottom", "top left", "top right",
                 "bottom left", "bottom right"],
}


def build_prompt(cls: str, shape: str = "", colour: str = "", size: str = "", number: str = "",
                 location: str = "", description: str = "") -> str:
    """Compose a prompt the way the benchmark's templates do (p1-p9)."""
    head = " ".join(w for w in (number, size, colour, shape, cls.strip()) if w)
    if description:
        text = f"{head} which is {description}"
        return f"{text} located in {location} of the image" if location else text
    return f"{head}, located in {location} of the image" if location else head


def prompt_type_of(number="", size="", colour="", shape="", location="", description="") -> str:
    """The benchmark type (p1-p9) that a set of attributes corresponds to, where one does."""
    if description:
        if location:
            return "p9"
        return "p8" if number or size or colour or shape else "p7"
    for ptype, used in (("p6", location), ("p5", number), ("p4", size), ("p3", colour), ("p2", shape)):
        if used:
            return ptype
    return "p1"


def load_annotations(path) -> list[dict]:
    """Read a benchmark annotation file, ``SET/anns/<split>.json``: a list of {img_name,
    mask_name, cat, prompts}. Each entry must name its image and mask as files inside the
    set's ``images/`` and ``masks/`` folders (ValueError naming the entry otherwise): no
    absolute name and no '..' part, so an index never makes anything outside the set be read
    or deleted. (A link inside those folders may point anywhere; a name cannot.)"""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"No annotation file at {path}.") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "img_name" in e for e in entries):
        raise ValueError(f"{path} is not in the benchmark's format (a list of {{'img_name', 'mask_name', 'prompts'}}).")
    for i, entry in enumerate(entries):
        for key, sub in (("img_name", "images"), ("mask_name", "masks")):
            name = entry.get(key)
            what = f"{path}: entry {i + 1} ({entry['img_name']!r})"
            if key not in entry:
                raise ValueError(f"{what} has no {key}; each entry names its image (img_name) and its mask "
                                 "(mask_name), files in the set's images/ and masks/.")
            if not inside_name(name):
                raise ValueError(f"{what} names the {key} {name!r}, which is not a file inside the set's {sub}/ "
                                 f"folder ({path.parent.parent / sub}); names may not be absolute or contain '..'.")
    return entries


def inside_name(name) -> bool:
    """Whether ``name`` names a file inside a folder by itself: a relative path with no '..'
    part (links inside the folder are the folder's business)."""
    import os
    from pathlib import PurePath

    if not isinstance(name, str) or not name.strip() or "\0" in name or os.path.isabs(name):
        return False
    parts = PurePath(name).parts
    return bool(parts) and ".." not in parts and parts != (".",)


def pick_prompt(entry: dict, prompt_type: str, rng: random.Random | None = None) -> str:
    """The entry's prompt of ``prompt_type``; one drawn with ``rng`` where the type holds a list."""
    if prompt_type not in PROMPT_TYPES and prompt_type != SYNONYM_TYPE:
        raise ValueError(f"Unknown prompt type {prompt_type!r}; use one of p0-p9.")
    value = entry["prompts"][prompt_type]
    if isinstance(value, list):
        return (rng or random.Random(0)).choice(value)
    return value
