"""Fixtures for the API tests: a realistic curated artifact built from the bundled real sample.

``sample_artifacts_dir`` is the one place to swap for an artifact built by the Dagster pipeline itself
(data/sample + tiny-random): anything that returns an artifacts dir with ``curated/CURRENT`` and
``images/`` works. Tests that modify the artifact get their own copy (``artifacts_copy``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from api_helpers import build_sample_artifact

from curation_dagster.core.settings import TINY_RANDOM


@pytest.fixture(scope="session")
def tiny_encoder():
    """The real tiny-random CLIP, loaded through the same from_pretrained path as a real checkpoint."""
    from curation_dagster.core.encoder import ClipEncoder

    return ClipEncoder.load(TINY_RANDOM, "cpu")


@pytest.fixture(scope="session")
def sample_artifacts_dir(tmp_path_factory, tiny_encoder) -> Path:
    """Artifacts dir holding one curated version of the whole bundled sample (547 real rows, 27 classes)."""
    d = tmp_path_factory.mktemp("artifacts")
    build_sample_artifact(d, tiny_encoder)
    return d


@pytest.fixture
def artifacts_copy(sample_artifacts_dir, tmp_path) -> Path:
    """A private copy of the sample artifact that a test may change (new versions, damage)."""
    dest = tmp_path / "artifacts"
    shutil.copytree(sample_artifacts_dir, dest)
    return dest
