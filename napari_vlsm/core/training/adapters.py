"""Concept adapters: a class the model did not know is taught on a path of its own.

Finetuning one shared small network on 20 corrections of a new domain moves the weights the
old classes depend on (measured in docs/corrections.md: polyp Dice 0.84 -> 0.74-0.79 even
with replay). So when every prompt of a training set is new to a model that already knows
something (it has a replay sample or a card), the FiLM-UNet gets an adapter: a copy of its
image path started from the base's weights, trained alone while the base stays frozen. The
route table sends each prompt to a path by its nearest prompt (``FilmUNetForSegmentation.route``):
the base's own prompts and the negatives it was trained with stay with the base, whose
answers to them are unchanged; the new prompts go to the adapter. The replay sample's
images teach the adapter where its class is absent (empty masks for the new prompts).

Corrections of a class the model knows, or a mixture of old and new classes, train the
shared network with replay instead.
"""

from __future__ import annotations

import torch

from napari_vlsm.core.models.film_unet import ImagePath
from napari_vlsm.core.data.training_sets import Example

ADAPTER_MODES = ("auto", "off")


def example_prompts(examples: list[Example]) -> list[str]:
    """Every distinct prompt text of the examples, all prompt types, in order."""
    seen: dict[str, None] = {}
    for ex in examples:
        for value in ex.prompts.values():
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and text.strip():
                    seen.setdefault(text.strip(), None)
    return list(seen)


def _base_classes(replay_set: list[Example], card: dict) -> list[str]:
    """The prompts of the classes the base knows: its replay pairs' and its card's suggestions."""
    texts = example_prompts(replay_set) + [t.strip() for t in card.get("suggestions", []) if isinstance(t, str)]
    return list(dict.fromkeys(t for t in texts if t))


def plan_adapter(backend, train_set: list[Example], replay_set: list[Example], card: dict,
                 mode: str = "auto") -> int | None:
    """The adapter a run trains (an existing one's number, or the next number for a new
    class), or None for the shared recipe. A prompt the base was only taught as absent (a
    negative, "wound") may become a class of its own."""
    from napari_vlsm.core.models.families import family_of_backend

    family = family_of_backend(backend)
    if mode == "off" or not (family and family.adapters) or not (replay_set or card):
        return None  # only a family that has adapters (a routing table in its config) gets one
    module = backend.module
    owner = {p.casefold(): o for p, o in zip(module.config.route_prompts, module.config.route_owners)}
    known = {p.casefold() for p in _base_classes(replay_set, card)} - {p for p, o in owner.items() if o}
    prompts = [p.casefold() for p in example_prompts(train_set)]
    if not prompts or any(p in known for p in prompts):
        return None  # a class the base knows: the shared recipe, with replay
    adapters = {owner[p] for p in prompts if owner.get(p)}
    if len(adapters) > 1:
        return None  # classes of two adapters at once
    return adapters.pop() if adapters else len(module.adapters) + 1


@torch.no_grad()
def prepare_adapter(backend, k: int, train_set: list[Example], replay_set: list[Example], card: dict,
                    negatives: list[str]) -> list[str]:
    """Create adapter ``k`` when it is new and route the training prompts to it (the base's
    prompts and ``negatives`` to the base, when the table is new); the prompts it learns."""
    module = backend.module
    if k > len(module.adapters):
        module.add_adapter()
    table = dict(zip(module.config.route_prompts, module.config.route_owners))
    if not table:
        absent = [t.strip() for t in list(card.get("negatives", [])) + list(negatives) if isinstance(t, str)]
        table = {p: 0 for p in _base_classes(replay_set, card) + [t for t in absent if t]}
    new = example_prompts(train_set)
    table.update({p: k for p in new})
    prompts = list(table)
    embeddings = torch.cat([backend.encode_text(prompts[i:i + 256]).float() for i in range(0, len(prompts), 256)])
    module.set_routes(prompts, list(table.values()), embeddings)
    return new


def adapter_parameters(backend, k: int) -> list[torch.nn.Parameter]:
    """Adapter ``k``'s weights, the only ones that train; the rest is frozen."""
    backend.module.requires_grad_(False)
    backend.module.adapters[k - 1].requires_grad_(True)
    return list(backend.module.adapters[k - 1].parameters())


class AdapterView:
    """The backend as the training loop of adapter ``k`` sees it: images go through that
    path only (the base's forward would be wasted work), text and the rest as usual."""

    def __init__(self, backend, k: int):
        self._backend, self._path = backend, backend.module.adapters[k - 1]

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode_image(self, pixel_values, guidance=None):
        return ImagePath.encode(self._path, pixel_values.to(self._backend.dtype), guidance)

    def encode_guided(self, features, guidance):
        return ImagePath.encode_guided(self._path, features, guidance.to(self._backend.dtype))

    def decode(self, features, text):
        return ImagePath.decode(self._path, features, text.to(features[0].dtype))
