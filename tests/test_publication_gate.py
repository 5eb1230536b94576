"""Publication never serves data whose blocking check failed, also outside the run where the check failed (from a
review, 2026-11-29: both cases published before the gate in assets/_check_gate.py)."""
from __future__ import annotations

import os

import dagster as dg
import pytest

from pipeline_helpers import SAMPLE_DIR, up_to_publication


def make_job():
    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    res = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=os.environ["GATE_TEST_ARTIFACTS"],
                          model="tiny-random", device="cpu")
    job = dg.define_asset_job("publication_job", selection=up_to_publication())
    return dg.Definitions(assets=ASSETS, asset_checks=ALL_CHECKS, jobs=[job], resources=res,
                          executor=dg.in_process_executor).get_job_def("publication_job")


# A dedup that misses pairs (one neighbour, never searched wider, as in tests/test_publication.py) and a loose image
# threshold: duplicates are left and the blocking check curated_no_duplicates_left fails. The floor is not what these
# tests are about (the loose threshold removes ~2/3 of the 81 rows).
FAILING = {"ops": {"sampled_products": {"config": {"per_class_cap": 3}},
                   "curated_products": {"config": {"knn_k": 1, "image_dup_threshold": 0.5}},
                   "published_curated_version": {"config": {"min_kept_fraction": 0.2}}}}


@pytest.fixture
def failed_run(tmp_path, monkeypatch):
    """(instance, artifacts, the run whose curated check failed)"""
    from curation_dagster.core import dedup

    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("GATE_TEST_ARTIFACTS", str(artifacts))
    monkeypatch.setattr(dedup, "MAX_WIDENED_K", 1)
    with dg.instance_for_test() as instance:
        bad = dg.execute_job(dg.reconstructable(make_job), instance=instance, run_config=FAILING, raise_on_error=False)
        assert not bad.success
        assert {e.check_name: e.passed for e in bad.get_asset_check_evaluations()}["curated_no_duplicates_left"] is False
        yield instance, artifacts, bad


def _again(instance, options):
    return dg.execute_job(dg.reconstructable(make_job), instance=instance, run_config=FAILING, raise_on_error=False,
                          reexecution_options=options)


def test_reexecuting_only_the_publish_step_never_publishes_a_version_whose_check_failed(failed_run):
    from curation_dagster.core.artifacts import read_current_version_name, versions_of_run

    instance, artifacts, bad = failed_run
    assert read_current_version_name(artifacts) is None
    staged = versions_of_run(artifacts, bad.run_id, staged=True)
    assert len(staged) == 1
    # Operator: "re-execute selected step" on the publish step of the failed run (UI / CLI).
    again = _again(instance, dg.ReexecutionOptions(parent_run_id=bad.run_id, step_selection=["published_curated_version"]))
    assert read_current_version_name(artifacts) != staged[0], f"published {staged[0]}, whose blocking check failed"
    assert not again.success
    failure = next(e for e in again.all_events if e.event_type_value == "STEP_FAILURE")
    assert "blocking check curated_no_duplicates_left failed" in failure.event_specific_data.error.message


def test_reexecute_from_failure_runs_the_failed_check_again(failed_run):
    """'Re-execute from failure' re-runs the failed check, which blocks publication again."""
    from curation_dagster.core.artifacts import read_current_version_name

    instance, artifacts, bad = failed_run
    assert not _again(instance, dg.ReexecutionOptions.from_failure(bad.run_id, instance)).success
    assert read_current_version_name(artifacts) is None


def test_the_sharded_workflow_never_publishes_from_clean_data_whose_check_failed(tmp_path, monkeypatch):
    from curation_dagster.assets import clean as clean_asset
    from curation_dagster.assets.embeddings import N_SHARDS
    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.core.artifacts import read_current_version_name
    from curation_dagster.definitions_sharded import SHARDED_ASSETS
    from curation_dagster.resources import build_resources

    real = clean_asset.run_cleaning

    def lossy_cleaning(*a, **k):  # a cleaning bug: one row silently lost (neither clean nor rejected)
        r = real(*a, **k)
        r.clean = r.clean.slice(1)
        return r

    monkeypatch.setattr(clean_asset, "run_cleaning", lossy_cleaning)
    art = tmp_path / "artifacts"
    res = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=str(art), model="tiny-random", device="cpu",
                          run_lease="run")
    instance = dg.DagsterInstance.ephemeral()
    defs = [*SHARDED_ASSETS, *ALL_CHECKS]

    # Step 1 (ingest_job): the blocking check clean_counts_add_up fails
    step1 = dg.materialize(defs, resources=res, instance=instance, raise_on_error=False,
                           selection=dg.AssetSelection.groups("ingest"),
                           run_config={"ops": {"sampled_products": {"config": {"per_class_cap": 2}}}})
    assert not step1.success
    assert {e.check_name: e.passed for e in step1.get_asset_check_evaluations()}["clean_counts_add_up"] is False
    # Step 2 (embedding_shards_job, one run per partition) and step 3 (curate_from_shards_job, evaluation left out)
    for shard in range(N_SHARDS):
        dg.materialize(defs, resources=res, instance=instance, partition_key=str(shard),
                       selection=dg.AssetSelection.assets("clip_embedding_shards"))
    step3 = dg.materialize(defs, resources=res, instance=instance, raise_on_error=False,
                           selection=dg.AssetSelection.assets("clip_embeddings") | dg.AssetSelection.groups("curate"))
    assert read_current_version_name(art) is None, (
        f"step 3 success={step3.success}: published {read_current_version_name(art)} from clean_products whose "
        "blocking check clean_counts_add_up failed")
    failure = next(e for e in step3.all_events if e.event_type_value == "STEP_FAILURE")
    assert "clean_products: blocking check clean_counts_add_up failed" in failure.event_specific_data.error.message
