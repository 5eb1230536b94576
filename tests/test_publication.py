"""Publication happens after the checks, only for the run's own version, above a floor, readable by any user."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from curation_dagster.core import artifacts as art
from curation_dagster.core.artifacts import (
    ArtifactError,
    PublishFloor,
    PublishRefused,
    build_probe,
    list_versions,
    load_version,
    publish_version,
    read_current_version_name,
    verify_probe,
    versions_of_run,
    write_staged_version,
)
from pipeline_helpers import SAMPLE_DIR, up_to_publication
from test_artifacts import make_inputs

SMALL = {"sampled_products": {"config": {"per_class_cap": 3}}}
PUBLISHED = up_to_publication()


def _run(artifacts: Path, curate: dict | None = None, publish: dict | None = None, instance=None):
    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    ops = dict(SMALL)
    if curate:
        ops["curated_products"] = {"config": curate}
    if publish:
        ops["published_curated_version"] = {"config": publish}
    resources = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=str(artifacts), model="tiny-random",
                                device="cpu")
    return dg.materialize([*ASSETS, *ALL_CHECKS], resources=resources, run_config={"ops": ops}, selection=PUBLISHED,
                          instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False)


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def test_failed_curated_check_never_publishes(tmp_path, monkeypatch):
    from curation_dagster.core import dedup

    artifacts = tmp_path / "artifacts"
    good = _run(artifacts)
    assert good.success
    served = read_current_version_name(artifacts)
    assert served is not None and "published_curated_version" in _materialized(good)

    # A dedup that misses pairs (one neighbour per row, never searched wider) and a loose image threshold:
    # duplicates are left in the curated set, which the exact check finds.
    monkeypatch.setattr(dedup, "MAX_WIDENED_K", 1)
    bad = _run(artifacts, curate={"knn_k": 1, "image_dup_threshold": 0.5})
    assert not bad.success
    checks = {e.check_name: e.passed for e in bad.get_asset_check_evaluations()}
    assert checks["curated_no_duplicates_left"] is False
    assert "published_curated_version" not in _materialized(bad)
    assert read_current_version_name(artifacts) == served  # the API keeps serving the good version
    assert list_versions(artifacts) == [served]
    # The refused version is complete and kept for inspection, under _staged/, named after its run.
    staged = versions_of_run(artifacts, bad.run_id, staged=True)
    assert len(staged) == 1 and (artifacts / "curated" / "_staged" / staged[0] / "manifest.json").is_file()


def test_publish_floor_refuses_an_empty_version(tmp_path):
    artifacts = tmp_path / "artifacts"
    assert _run(artifacts).success
    served = read_current_version_name(artifacts)
    empty = _run(artifacts, curate={"drop_fraction": None, "min_score": 1.0, "min_keep_per_class": 0})
    assert not empty.success
    failures = [e for e in empty.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and "below the publish floor" in str(failures[0].event_specific_data.error.message)
    assert read_current_version_name(artifacts) == served
    # A floor of 0 publishes it: the floor is the setting, not a hard-coded refusal.
    zero = _run(artifacts, curate={"drop_fraction": None, "min_score": 1.0, "min_keep_per_class": 0},
                publish={"min_rows": 0, "min_kept_fraction": 0.0})
    assert zero.success and load_version(artifacts).count == 0


def test_each_run_checks_and_publishes_its_own_version(tmp_path):
    """Two runs staged versions at once: each publishes (and would check) its own, by run id."""
    a = write_staged_version(tmp_path, *make_inputs(seed=1), run_id="aaaa-1111")
    b = write_staged_version(tmp_path, *make_inputs(seed=2), run_id="bbbb-2222")
    assert versions_of_run(tmp_path, "aaaa-1111", staged=True) == [a.version]
    assert versions_of_run(tmp_path, "bbbb-2222", staged=True) == [b.version]
    assert read_current_version_name(tmp_path) is None  # staged is not published
    publish_version(tmp_path, b.version)
    assert read_current_version_name(tmp_path) == b.version
    assert versions_of_run(tmp_path, "aaaa-1111", staged=True) == [a.version]  # untouched by b's publication
    # a staged earlier: publishing it now would take CURRENT back (refused; it stays staged, b stays served)
    with pytest.raises(PublishRefused, match="newer version"):
        publish_version(tmp_path, a.version)
    assert read_current_version_name(tmp_path) == b.version and list_versions(tmp_path) == [b.version]
    assert versions_of_run(tmp_path, "aaaa-1111", staged=True) == [a.version]


def test_publish_floor_rules():
    floor = PublishFloor(min_rows=10, min_kept_fraction=0.5)
    assert floor.problems(10, 20) == []
    assert "below the publish floor of 10 rows" in floor.problems(9, 10)[0]
    assert "kept (40.0%)" in floor.problems(40, 100)[0]


def test_floor_refusal_moves_nothing(tmp_path):
    records, img, txt, manifest = make_inputs(n=6)
    info = write_staged_version(tmp_path, records, img, txt, dict(manifest, counts={"clean": 100}), run_id="r1")
    with pytest.raises(PublishRefused, match="6/100 clean rows kept"):
        publish_version(tmp_path, info.version, floor=PublishFloor())
    assert read_current_version_name(tmp_path) is None and list_versions(tmp_path) == []
    assert versions_of_run(tmp_path, "r1", staged=True) == [info.version]


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="needs root (to run a reader as the 'nobody' user) and /usr/bin/python3")
def test_a_reader_running_as_another_user_can_read_everything(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="curation-perm-"))
    try:
        os.chmod(root, 0o755)
        old = os.umask(0o077)  # a writer with a strict umask: modes must be explicit, not inherited
        try:
            info = art.publish_curated_version(root / "artifacts", *make_inputs())
        finally:
            os.umask(old)
        script = (
            "import sys, pathlib; c = pathlib.Path(sys.argv[1]) / 'curated'; v = (c / 'CURRENT').read_text().strip();"
            "[print(f.name, len(f.read_bytes())) for f in sorted((c / v).iterdir())]"
        )
        proc = subprocess.run(["/usr/bin/python3", "-I", "-c", script, str(root / "artifacts")], user="nobody",
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert sorted(line.split()[0] for line in proc.stdout.splitlines()) == sorted(art.VERSION_FILES)
        assert (Path(root / "artifacts/curated/CURRENT").stat().st_mode & 0o777) == 0o644
        assert (info.path.stat().st_mode & 0o777) == 0o755
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "CURRENT").mkdir(), "is a directory"),
    (lambda c: (c / "CURRENT").write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
    (lambda c: (os.symlink(c / "loop-b", c / "loop-a"), os.symlink(c / "loop-a", c / "loop-b"),
                os.symlink(c / "loop-a", c / "CURRENT")), "cannot read"),
])
def test_malformed_current_is_a_clear_error(tmp_path, damage, message):
    cdir = tmp_path / "curated"
    cdir.mkdir()
    damage(cdir)
    with pytest.raises(ArtifactError, match=message):
        read_current_version_name(tmp_path)
    with pytest.raises(ArtifactError, match=message):
        load_version(tmp_path)


def test_artifacts_path_that_is_a_file(tmp_path):
    (tmp_path / "artifacts").write_text("oops")
    with pytest.raises(ArtifactError, match="is not a directory"):
        read_current_version_name(tmp_path / "artifacts")


def _encoder_from_table(table: dict[str, np.ndarray]):
    return lambda texts: np.stack([table[t] for t in texts])


def test_probe_tells_real_vectors_from_random_ones(tmp_path):
    records, img, txt, manifest = make_inputs(n=6, d=8)
    texts = records["designation"].to_list()
    encode = _encoder_from_table(dict(zip(texts, txt)))
    manifest = dict(manifest, probe=build_probe(texts, n=4))
    good = art.publish_curated_version(tmp_path / "good", records, img, txt, manifest)
    assert verify_probe(load_version(tmp_path / "good"), encode) > 0.999
    assert good.count == 6

    rng = np.random.default_rng(7)
    fake = rng.standard_normal(txt.shape).astype(np.float32)
    fake /= np.linalg.norm(fake, axis=1, keepdims=True)
    art.publish_curated_version(tmp_path / "fake", records, img, fake, manifest)  # valid shape, norm and dim
    with pytest.raises(ArtifactError, match="do not match the model"):
        verify_probe(load_version(tmp_path / "fake"), encode)

    art.publish_curated_version(tmp_path / "none", records, img, txt, {"model": "m"})
    with pytest.raises(ArtifactError, match="no valid probe"):
        verify_probe(load_version(tmp_path / "none"), encode)


def test_probe_rows_are_spread_and_bounded():
    p = build_probe([f"t{i}" for i in range(100)], n=8)
    assert len(p["rows"]) == 8 and p["rows"][0] == 0 and p["rows"][-1] == 99
    assert p["texts"] == [f"t{i}" for i in p["rows"]]
    assert build_probe(["only"]) == {"rows": [0], "texts": ["only"]}
