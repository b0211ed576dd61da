"""Write a copy of a text-only FiLM-UNet folder that also takes clicks, a box and the previous
result (guidance encoders that start at zero: it answers text prompts exactly as before),
with its tokenizer; the card, training record and replay sample are not copied.

    python scripts/add_guidance.py MODEL_FOLDER OUT_FOLDER
"""

import sys
from pathlib import Path

from napari_vlsm.core.models.film_unet import FilmUNetForSegmentation, with_guidance
from napari_vlsm.core.models.loading import strict_from_pretrained
from napari_vlsm.core.models.processors import load_tokenizer


def main(folder: str, out: str) -> None:
    module = with_guidance(strict_from_pretrained(FilmUNetForSegmentation, folder))
    module.save_pretrained(Path(out))
    load_tokenizer(Path(folder)).save_pretrained(Path(out))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
