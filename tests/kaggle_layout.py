"""The bundled sample laid out exactly like the Kaggle download (importable helper for tests).

X_train_update.csv + Y_train_CVw08PX.csv (the labelled part, images in images/image_train/), X_test_update.csv
(the unlabelled part, images in images/image_test/), unnamed index column, no categories.csv.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from pipeline_helpers import SAMPLE_DIR


def _rows() -> list[dict]:
    with open(SAMPLE_DIR / "X_sample.csv", encoding="utf-8", newline="") as fh:
        x = list(csv.DictReader(fh))
    with open(SAMPLE_DIR / "Y_sample.csv", encoding="utf-8", newline="") as fh:
        y = {r[""]: r["prdtypecode"] for r in csv.DictReader(fh)}
    for r in x:
        r["prdtypecode"] = y[r[""]]
    return x


def kaggle_layout(root: Path, *, per_class: int = 8, test_per_class: int = 2) -> dict:
    """Write the layout under root from the first ``per_class`` rows of each class; the last ``test_per_class`` of
    them become the unlabelled test part. Returns {"train": [productid], "test": [productid]}."""
    by_class: dict[str, list[dict]] = {}
    for r in _rows():
        by_class.setdefault(r["prdtypecode"], []).append(r)
    train, test = [], []
    for rows in by_class.values():
        chosen = rows[:per_class]
        train += chosen[: len(chosen) - test_per_class]
        test += chosen[len(chosen) - test_per_class:]
    for sub in ("image_train", "image_test"):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)

    def write_x(name: str, rows: list[dict], sub: str) -> None:
        with open(root / name, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", "designation", "description", "productid", "imageid"])
            for i, r in enumerate(rows):
                w.writerow([i, r["designation"], r["description"], r["productid"], r["imageid"]])
                img = f"image_{r['imageid']}_product_{r['productid']}.jpg"
                shutil.copyfile(SAMPLE_DIR / "images" / "image_train" / img, root / "images" / sub / img)

    write_x("X_train_update.csv", train, "image_train")
    write_x("X_test_update.csv", test, "image_test")
    with open(root / "Y_train_CVw08PX.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "prdtypecode"])
        for i, r in enumerate(train):
            w.writerow([i, r["prdtypecode"]])
    return {"train": [int(r["productid"]) for r in train], "test": [int(r["productid"]) for r in test]}
