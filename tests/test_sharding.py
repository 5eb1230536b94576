"""Sharded embedding (opt-in code location) gives the same embeddings as the unsharded asset."""
from __future__ import annotations

import dagster as dg
import numpy as np

from curation_dagster.assets.embeddings import N_SHARDS
from curation_dagster.checks import ALL_CHECKS
from curation_dagster.definitions import ASSETS
from curation_dagster.definitions_sharded import SHARDED_ASSETS
from curation_dagster.resources import build_resources

from pipeline_helpers import SAMPLE_DIR


def test_sharded_equals_unsharded(tmp_path):
    no_cache = {"config": {"use_cache": False}}
    common = {"sampled_products": {"config": {"per_class_cap": 2}}}
    res_a = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=str(tmp_path / "a"), model="tiny-random",
                            device="cpu")
    res_b = build_resources(data_dir=str(SAMPLE_DIR), artifacts_dir=str(tmp_path / "b"), model="tiny-random",
                            device="cpu")
    ingest = dg.AssetSelection.groups("ingest")
    unsharded = dg.materialize(ASSETS, resources=res_a, selection=ingest | dg.AssetSelection.assets("clip_embeddings"),
                               run_config={"ops": {**common, "clip_embeddings": no_cache}})
    full = unsharded.output_for_node("clip_embeddings")

    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(SHARDED_ASSETS, resources=res_b, selection=ingest, instance=instance,
                   run_config={"ops": common})
    sizes = []
    for shard in range(N_SHARDS):
        r = dg.materialize(SHARDED_ASSETS, resources=res_b, partition_key=str(shard), instance=instance,
                           selection=dg.AssetSelection.assets("clip_embedding_shards"),
                           run_config={"ops": {"clip_embedding_shards": no_cache}})
        sizes.append(len(r.output_for_node("clip_embedding_shards")))
    assembled = dg.materialize([*SHARDED_ASSETS, *ALL_CHECKS], resources=res_b, instance=instance,
                               selection=dg.AssetSelection.assets("clip_embeddings"))
    merged = assembled.output_for_node("clip_embeddings")
    assert all(e.passed for e in assembled.get_asset_check_evaluations())
    assert sum(sizes) == len(full) == 54 and min(sizes) > 0
    assert merged.ids["record_id"].to_list() == full.ids["record_id"].to_list()
    # Same model, same inputs, different batch composition: equal up to float32 GEMM rounding.
    assert np.abs(merged.image - full.image).max() < 1e-5
    assert np.abs(merged.text - full.text).max() < 1e-5
