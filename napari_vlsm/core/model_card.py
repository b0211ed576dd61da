"""What a model knows, in words: the modalities and classes it was trained on, and prompts
to suggest. Kept beside the weights as ``vlsm_card.json``; finetuned checkpoints add the
classes of their corrections."""

from __future__ import annotations

import json
from pathlib import Path

CARD_FILE = "vlsm_card.json"


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
    from .loading import DEFAULT_SPEC, default_model_dir

    if spec is None or str(spec) == DEFAULT_SPEC:
        return read_card(default_model_dir())
    return read_card(spec) if Path(spec).is_dir() else {}


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


def card_after_finetune(base_card: dict, new_prompts: list[str]) -> dict:
    """The base's card plus the prompts the corrections taught (as suggestions)."""
    card = dict(base_card)
    suggestions = list(card.get("suggestions", []))
    card["suggestions"] = suggestions + [p for p in dict.fromkeys(new_prompts) if p not in suggestions]
    card["finetuned_on"] = sorted(set(card.get("finetuned_on", [])) | set(dict.fromkeys(new_prompts)))
    return card
