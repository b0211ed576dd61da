"""Rebuild the CLIP BPE tokenizer files shipped in napari_vlsm/assets/clip_tokenizer.

The CLIP vocabulary (OpenAI CLIP, MIT licence) ships inside the open_clip_torch wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. From it we write the ``vocab.json`` and
``merges.txt`` that ``transformers.CLIPTokenizer`` reads, so that no hub download is needed.

Usage: pip download --no-deps open_clip_torch -d /tmp/oc
       python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""

import gzip
import json
import sys
import zipfile
from pathlib import Path

def bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


OUT = Path(__file__).resolve().parents[1] / "napari_vlsm" / "assets" / "clip_tokenizer"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        text = gzip.decompress(zf.read(name)).decode("utf-8")
    merges = text.split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges written to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
