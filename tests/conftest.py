"""Shared fixtures: real Rakuten sample rows copied into temp dirs (to be damaged), and the tiny-random CLIP."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from pipeline_helpers import REPO, SAMPLE_DIR, materialize_all  # noqa: F401

# Keep torch/faiss/LightGBM from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on 2 shared cores
# Tests compare embeddings across batch compositions and processes to 1e-5: run them in fp32 whatever the CPU offers.
# The reduced-precision paths have their own tests (tests/test_encoder.py), which ask for them explicitly.
os.environ.setdefault("CURATION_PRECISION", "fp32")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Build tiny-random once per session into a private cache (nothing from the user's cache leaks in)."""
    if "CURATION_MODEL_CACHE" not in os.environ:
        os.environ["CURATION_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model_cache"))
    yield


def sample_rows(n: int | None = None) -> list[dict]:
    """The first n sample rows as dicts (index, designation, description, productid, imageid, prdtypecode)."""
    x = pl.read_csv(SAMPLE_DIR / "X_sample.csv", infer_schema=False)
    y = pl.read_csv(SAMPLE_DIR / "Y_sample.csv", infer_schema=False)
    x = x.rename({x.columns[0]: "index"})
    y = y.rename({y.columns[0]: "index"})
    rows = x.join(y, on="index", how="left").to_dicts()
    return rows if n is None else rows[:n]


class SourceBuilder:
    """Writes a source tree in the Rakuten layout from row dicts, copying each row's real image."""

    def __init__(self, root: Path, rows: list[dict]):
        self.root = root
        self.rows = [dict(r) for r in rows]
        self.images = root / "images" / "image_train"
        self.images.mkdir(parents=True, exist_ok=True)
        for r in self.rows:
            self.copy_image(r)
        shutil.copy(SAMPLE_DIR / "categories.csv", root / "categories.csv")

    def image_path(self, r: dict) -> Path:
        return self.images / f"image_{r['imageid']}_product_{r['productid']}.jpg"

    def copy_image(self, r: dict, src: dict | None = None) -> None:
        s = src or r
        shutil.copy(SAMPLE_DIR / "images" / "image_train" / f"image_{s['imageid']}_product_{s['productid']}.jpg",
                    self.image_path(r))

    def write(self, *, x_rows: list[dict] | None = None, y_rows: list[dict] | None = None, bom: bool = False,
              x_name: str = "X_train.csv", y_name: str = "Y_train.csv") -> Path:
        x_rows = self.rows if x_rows is None else x_rows
        y_rows = self.rows if y_rows is None else y_rows
        enc = "utf-8-sig" if bom else "utf-8"
        with open(self.root / x_name, "w", newline="", encoding=enc) as fh:
            w = csv.writer(fh)
            w.writerow(["", "designation", "description", "productid", "imageid"])
            for r in x_rows:
                w.writerow([r["index"], r["designation"], r["description"] or "", r["productid"], r["imageid"]])
        with open(self.root / y_name, "w", newline="", encoding=enc) as fh:
            w = csv.writer(fh)
            w.writerow(["", "prdtypecode"])
            for r in y_rows:
                w.writerow([r["index"], r["prdtypecode"]])
        return self.root


@pytest.fixture
def source_builder(tmp_path):
    def make(n: int = 12) -> SourceBuilder:
        return SourceBuilder(tmp_path / "source", sample_rows(n))
    return make


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """The full graph materialized once on the bundled sample (547 real rows) with tiny-random."""
    artifacts = tmp_path_factory.mktemp("pipeline_artifacts")
    result = materialize_all(SAMPLE_DIR, artifacts)
    return artifacts, result
