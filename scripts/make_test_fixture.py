"""Build tests/data: a small real fixture copied from ../shared/data, so the tests pass on a
fresh clone with nothing beside it. The first rows of each split, plus the images the tests
name; files are copied as they are. Run from the repository root."""

import json
import shutil
from pathlib import Path

SRC = Path("../shared/data")
OUT = Path("tests/data")
TAKE = {"kvasir_seg": (16, 4), "clinicdb": (4, 2), "bkai_polyp": (4, 2), "busi": (12, 4),
        "colonoscopy_negatives": (4, 2), "isic": (6, 4), "chest_xray": (3, 4), "fetal_head": (4, 4)}
# chest_xray: N images of each class (covid, noncovid, normal), both rows (lungs, infection) of each
ROWS_PER_IMAGE = {"chest_xray": True}
NAMED = {"kvasir_seg": ["cju0qkwl35piu0993l0dewei2.jpg"]}

for name, (n_train, n_val) in TAKE.items():
    for split, n in (("train", n_train), ("val", n_val)):
        rows = json.loads((SRC / name / "anns" / f"{split}.json").read_text())
        if name == "busi":  # tumours and normal images both; every normal val image, so the
            normal = [r for r in rows if "normal" in r["img_name"]]  # "gives nothing" bound means the same here
            rows = [r for r in rows if "normal" not in r["img_name"]][: n - 2] + (normal if split == "val" else normal[:2])
        elif ROWS_PER_IMAGE.get(name):
            ids = []
            for cls in ("covid_", "noncovid_", "normal_"):
                ids += list(dict.fromkeys(r["img_name"] for r in rows if r["img_name"].startswith(cls)))[: max(n // 3, 1)]
            ids += [i for i in dict.fromkeys(r["img_name"] for r in rows if r["img_name"].startswith("covid_"))
                    if i not in ids][: n - len(ids)]
            rows = [r for r in rows if r["img_name"] in ids]
        else:
            rows = rows[:n]
        if split == "train":
            extra = [r for r in json.loads((SRC / name / "anns" / "train.json").read_text())
                     if r["img_name"] in NAMED.get(name, []) and r not in rows]
            rows += extra
        (OUT / name / "anns").mkdir(parents=True, exist_ok=True)
        (OUT / name / "anns" / f"{split}.json").write_text(json.dumps(rows, indent=1))
        for r in rows:
            for sub, key in (("images", "img_name"), ("masks", "mask_name")):
                (OUT / name / sub).mkdir(exist_ok=True)
                shutil.copyfile(SRC / name / sub / r[key], OUT / name / sub / r[key])
    shutil.copyfile(SRC / name / "README.md", OUT / name / "README.md") if (SRC / name / "README.md").exists() else None
print("wrote", OUT)
