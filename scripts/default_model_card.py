"""Write the default model's card (vlsm_card.json) into a model folder: the template
scripts/default_model_card.json, the negatives it was trained on (a later adapter's route
table keeps them with the base), and the vocabulary of every prompt it was trained on (the
plugin names the words of a prompt the model never saw).

    python scripts/default_model_card.py MODEL_FOLDER DATA_FOLDER [DATA_FOLDER ...]

Used by scripts/train_offline_model.sh; the data folders are the training sets, whose train
splits' prompts p1-p9 and scripts/synonyms.json's short forms are what the training drew from.
"""

import json
import sys
from pathlib import Path

from napari_vlsm.core.data.concepts import add_synonyms
from napari_vlsm.core.models.model_card import CARD_FILE, VOCABULARY, vocabulary
from napari_vlsm.core.data.prompts import SYNONYM_TYPE
from napari_vlsm.core.training.train import trained_prompts
from napari_vlsm.core.data.training_sets import TRAIN_PROMPT_TYPES, benchmark_examples, folder_of_kind

HERE = Path(__file__).resolve().parent


def main(folder: str, data_dirs: list[str]) -> None:
    """The template says which data set each modality and name belongs to; a model trained
    without some of them (a leave-one-domain-out base) gets a card without them."""
    card = json.loads((HERE / "default_model_card.json").read_text())
    sets = [Path(d).name for d in data_dirs]
    negatives = [line.strip() for line in (HERE / "negative_prompts_five_modalities.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    card["negatives"] = negatives
    examples = [ex for d in data_dirs for ex in benchmark_examples(d, "train")]
    synonyms = json.loads((HERE / "synonyms.json").read_text())
    add_synonyms(examples, {k: v for k, v in synonyms.items() if folder_of_kind(k) in sets})
    prompts = trained_prompts(examples, (*TRAIN_PROMPT_TYPES, SYNONYM_TYPE), negatives)
    left_out = [name for key, name in card["trained_on"].items() if key not in sets]
    if left_out:
        card["title"] += f", less {', '.join(left_out)}"
    card["knows"] = [{k: v for k, v in entry.items() if k != "sets"} for entry in card["knows"]
                     if set(entry["sets"]) & set(sets)]
    card["trained_on"] = [name for key, name in card["trained_on"].items() if key in sets]
    said = {p.casefold() for p in prompts}
    card["suggestions"] = [s for s in card["suggestions"] if s.casefold() in said]
    card[VOCABULARY] = vocabulary(prompts)
    (Path(folder) / CARD_FILE).write_text(json.dumps(card, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
