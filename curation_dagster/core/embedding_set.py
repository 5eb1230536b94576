"""Embeddings of the clean rows as one versionable unit: an id table plus image/text matrices (row i ↔ row i).

Stored as ``ids.parquet`` + ``image.npy`` + ``text.npy`` + ``meta.json`` in one directory, written to a temporary
sibling and renamed, so a reader never sees a half-written set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .atomic import replace_dir, staging_dir


@dataclass
class EmbeddingSet:
    ids: pl.DataFrame            # record_id, image_sha256, text_sha256 (+ shard columns), row order = matrix rows
    image: np.ndarray            # float32 [n, d], L2-normalised
    text: np.ndarray             # float32 [n, d], L2-normalised
    meta: dict = field(default_factory=dict)  # model_name, model_identity, meaningless, dim, text_fields, ...

    def __post_init__(self) -> None:
        n = self.ids.height
        if self.image.shape[0] != n or self.text.shape[0] != n:
            raise ValueError(f"embedding rows ({self.image.shape[0]}, {self.text.shape[0]}) != id rows ({n})")
        if n and self.image.shape[1] != self.text.shape[1]:
            raise ValueError(f"image dim {self.image.shape[1]} != text dim {self.text.shape[1]}")

    @property
    def dim(self) -> int:
        return int(self.image.shape[1]) if self.image.ndim == 2 else 0

    def __len__(self) -> int:
        return self.ids.height

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with staging_dir(directory.parent, prefix=directory.name) as tmp:
            self.ids.write_parquet(tmp / "ids.parquet")
            np.save(tmp / "image.npy", np.ascontiguousarray(self.image, dtype=np.float32))
            np.save(tmp / "text.npy", np.ascontiguousarray(self.text, dtype=np.float32))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str))
            replace_dir(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory: Path) -> "EmbeddingSet":
        directory = Path(directory)
        missing = [f for f in ("ids.parquet", "image.npy", "text.npy", "meta.json") if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"embedding set {directory} is incomplete: missing {', '.join(missing)}")
        return cls(
            ids=pl.read_parquet(directory / "ids.parquet"),
            image=np.load(directory / "image.npy", allow_pickle=False),
            text=np.load(directory / "text.npy", allow_pickle=False),
            meta=json.loads((directory / "meta.json").read_text()),
        )

    def select(self, record_ids) -> "EmbeddingSet":
        """Rows in the order of ``record_ids`` (every id must be present)."""
        pos = {rid: i for i, rid in enumerate(self.ids["record_id"].to_list())}
        missing = [r for r in record_ids if r not in pos]
        if missing:
            raise KeyError(f"{len(missing)} record ids have no embedding, e.g. {missing[:5]}")
        idx = np.fromiter((pos[r] for r in record_ids), dtype=np.int64, count=len(record_ids))
        return EmbeddingSet(self.ids[idx], self.image[idx], self.text[idx], dict(self.meta))

    @classmethod
    def concat(cls, parts: list["EmbeddingSet"]) -> "EmbeddingSet":
        if not parts:
            raise ValueError("no embedding sets to concatenate")
        identities = {p.meta.get("model_identity") for p in parts}
        if len(identities) > 1:
            raise ValueError(f"cannot combine embeddings of different models: {sorted(map(str, identities))}")
        # shards of one set must also have embedded the same text and decoded images the same way: a mix would
        # give two score distributions under one alignment cut and a manifest that misstates the text embedded
        for key in ("include_description", "image_decode", "dim"):
            values = {json.dumps(p.meta.get(key)) for p in parts}
            if len(values) > 1:
                raise ValueError(f"cannot combine embeddings made with different {key} settings: {sorted(values)}; "
                                 "re-embed the shards with one setting")
        return cls(pl.concat([p.ids for p in parts]), np.concatenate([p.image for p in parts]),
                   np.concatenate([p.text for p in parts]), dict(parts[0].meta))
