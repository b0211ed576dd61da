"""What each pooled data set is about, and the prompts that must find nothing in it.

A data set's *concept* is its most common p1 prompt ("polyp", "tumor in the breast
ultrasound image."), case-folded. Sets that share a concept (Kvasir-SEG, CVC-ClinicDB and
polyp-free frames all answer "polyp") teach the same words; sets with different concepts
teach each other what to leave alone: a prompt of one concept on an image of another is
trained to give an empty mask. That is what makes the prompt choose the target when
several modalities are pooled, rather than the image alone deciding.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

from napari_vlsm.core.data.prompts import SYNONYM_TYPE
from napari_vlsm.core.data.training_sets import Example, folder_of_kind


def concept_of(examples: list[Example]) -> dict[str, str]:
    """kind (a data set, or a target of a set of several) -> concept (its most common p1
    prompt, case-folded)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for ex in examples:
        p1 = ex.prompts.get("p1")
        if isinstance(p1, str) and p1.strip():
            counts[ex.kind][p1.strip().casefold()] += 1
    return {g: c.most_common(1)[0][0] for g, c in counts.items()}


def add_synonyms(examples: list[Example], synonyms: dict[str, list[str]]) -> list[Example]:
    """Give every example of a kind (FOLDER:TARGET) or group (FOLDER) listed in ``synonyms``
    the extra prompt type 'syn'."""
    unknown = set(synonyms) - {ex.group for ex in examples} - {ex.kind for ex in examples}
    if unknown:
        raise ValueError(f"Synonyms name data sets that are not being trained: {', '.join(sorted(unknown))}. "
                         "Keys are the data folders' names (FOLDER:TARGET for one target of a folder of several).")
    for ex in examples:
        extra = synonyms.get(ex.kind) or synonyms.get(ex.group)
        if extra:
            ex.prompts = {**ex.prompts, SYNONYM_TYPE: list(extra)}
    return examples


STOP_WORDS = {"the", "and", "with", "which", "image", "images", "located", "one", "two", "small", "large",
              "medium", "left", "right", "top", "bottom", "center", "breast", "ultrasound"}


def content_words(prompt: str) -> set[str]:
    """The words of a prompt that name a thing (case-folded, plural 's' dropped)."""
    words = re.findall(r"[a-z0-9][a-z0-9-]+", prompt.casefold())
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words if len(w) > 2 and w not in STOP_WORDS}


def absent_concepts(concepts: dict[str, str], kind: str) -> list[str]:
    """The concepts that are absent from an image of ``kind``: those of other data sets (a
    set of several targets holds all of its targets on the same images: the lungs are not
    absent from an X-ray asked for the infection)."""
    own = {c for k, c in concepts.items() if folder_of_kind(k) == folder_of_kind(kind)}
    return sorted(set(concepts.values()) - own)


class NegativePrompts:
    """Draws a prompt for something absent from a given training image: half the time a
    prompt of another concept among the pooled sets (when there is one), otherwise one of
    the given generic negatives (organs, objects, random words)."""

    def __init__(self, examples: list[Example], prompt_types, generic: list[str]):
        self.concepts = concept_of(examples)
        self.by_concept: dict[str, list[Example]] = defaultdict(list)
        for ex in examples:
            if ex.kind in self.concepts and ex.prompts.get("p1", "").strip().casefold() == self.concepts[ex.kind]:
                self.by_concept[self.concepts[ex.kind]].append(ex)
        self.types = tuple(prompt_types) + ((SYNONYM_TYPE,) if SYNONYM_TYPE not in prompt_types else ())
        self.generic = list(generic)
        self._generic_cache: dict[str, list[str]] = {}

    def __bool__(self) -> bool:
        return bool(self.generic) or len(self.by_concept) > 1

    def own(self, ex: Example, rng: random.Random) -> str | None:
        """A prompt of ``ex``'s own class (from an example that shows it), or None: asked on
        an image or crop where that class is absent, the right answer is an empty mask."""
        same = self.by_concept.get(self.concepts.get(ex.kind))
        return rng.choice(same).prompt(self.types, rng) if same else None

    def draw(self, ex: Example, rng: random.Random) -> str:
        absent = absent_concepts(self.concepts, ex.kind) if ex.kind in self.concepts else list(self.by_concept)
        others = [c for c in self.by_concept if c in absent]
        generic = self._generic_for(ex.kind)
        if others and (not generic or rng.random() < 0.5):
            source = rng.choice(self.by_concept[rng.choice(others)])
            return source.prompt(self.types, rng)
        return rng.choice(generic)

    def _generic_for(self, kind: str) -> list[str]:
        """The generic negatives that name nothing of ``kind``'s folder: "fetal head" or "lung
        nodule" in a list of absent things must not be asked of fetal ultrasound or X-ray images
        (a shared content word with one of the folder's concepts leaves a negative out there)."""
        if kind not in self._generic_cache:
            own = {w for k, c in self.concepts.items() if folder_of_kind(k) == folder_of_kind(kind)
                   for w in content_words(c)}
            self._generic_cache[kind] = [g for g in self.generic if not (content_words(g) & own)] or self.generic
        return self._generic_cache[kind]
