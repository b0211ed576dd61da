"""What a model knows, in words: the modalities and classes it was trained on, and prompts
to suggest. Kept beside the weights as ``vlsm_card.json``; finetuned checkpoints add the
classes of their corrections."""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD_FILE = "vlsm_card.json"
VOCABULARY = "vocabulary"  # card key: the words of every prompt the model was trained on
_WORD = re.compile(r"[a-z][a-z0-9'-]*")


def read_card(folder) -> dict:
    """The card of a model folder; {} when it has none or it cannot be read."""
    if folder is None:
        return {}
    try:
        card = json.loads((Path(folder) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def card_for(spec: str | None) -> dict:
    """The card of a model spec that is the default or a local folder (nothing is fetched)."""
    from napari_vlsm.core.models.loading import local_folder

    return read_card(local_folder(spec))


def describe_card(card: dict) -> str:
    """One or two sentences for a person choosing a model."""
    if not card:
        return ""
    knows = "; ".join(f"{m['classes']} in {m['modality']}" for m in card.get("knows", []))
    text = card.get("title", "")
    if knows:
        text += f". Knows: {knows}."
    return text.strip()


def nothing_found_hint(card: dict, prompts: list[str]) -> str:
    """Said when a run finds nothing: what the model knows, so an image of another kind or an
    unknown word is recognised as such."""
    knows = ", ".join(f"{m['classes']} in {m['modality']}" for m in card.get("knows", []))
    if not knows:
        return ""
    return (f"This model knows {knows}; on an image of another kind, or for another class, it finds nothing. "
            "Correct a few masks and finetune it to teach it.")


def prompt_words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


def vocabulary(prompts) -> list[str]:
    """The sorted distinct words of ``prompts``, for a card's VOCABULARY."""
    return sorted({w for p in prompts for w in prompt_words(p)})


def unknown_words(card: dict, prompts: list[str]) -> list[str]:
    """Words of ``prompts`` that never appeared in the model's training prompts (a plural or
    singular of a known word counts as known); none when the card records no vocabulary."""
    known = set(card.get(VOCABULARY, []))
    if not known:
        return []
    words = dict.fromkeys(w for p in prompts for w in prompt_words(p))
    return [w for w in words if not {w, w.removesuffix("s"), w + "s", w.removesuffix("es")} & known]


def unknown_words_note(card: dict, prompts: list[str]) -> str:
    """Said beside a result: a word the model was never trained on means nothing to it, so
    "polyp in the nose" on a colonoscopy frame is answered as "polyp"."""
    words = unknown_words(card, prompts)
    if not words:
        return ""
    listed = ", ".join(repr(w) for w in words[:5]) + (" ..." if len(words) > 5 else "")
    return (f"The model was never trained on the word{'s' if len(words) > 1 else ''} {listed}: its answer rests "
            "on the words it knows.")


def card_after_finetune(base_card: dict, new_prompts: list[str], trained_prompts=()) -> dict:
    """The base's card plus the prompts the corrections taught (as suggestions), and the
    words of every prompt trained on (``trained_prompts``) in its vocabulary when it has one."""
    card = dict(base_card)
    suggestions = list(card.get("suggestions", []))
    card["suggestions"] = suggestions + [p for p in dict.fromkeys(new_prompts) if p not in suggestions]
    card["finetuned_on"] = sorted(set(card.get("finetuned_on", [])) | set(dict.fromkeys(new_prompts)))
    if card.get(VOCABULARY):
        card[VOCABULARY] = vocabulary([*card[VOCABULARY], *new_prompts, *trained_prompts])
    return card
