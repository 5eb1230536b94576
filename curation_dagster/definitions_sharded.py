"""Opt-in sharded variant of the code location: clip_embeddings is assembled from a partitioned shard asset.

`dagster dev -m curation_dagster.definitions_sharded`, then backfill `clip_embedding_shards` (all partitions: one
process each with the multiprocess executor, one pod each with dagster-k8s) and materialize the rest. Everything
else (assets, checks, IO, artifact) is the same as in curation_dagster.definitions.
"""
import dagster as dg

from .assets.embeddings import clip_embedding_shards, clip_embeddings, clip_embeddings_from_shards
from .automation import SENSORS
from .checks import ALL_CHECKS
from .definitions import ASSETS
from .resources import build_resources

SHARDED_ASSETS = [a for a in ASSETS if a is not clip_embeddings] + [clip_embedding_shards, clip_embeddings_from_shards]

ingest_job = dg.define_asset_job(
    "ingest_job", selection=dg.AssetSelection.groups("ingest"),
    description="Step 1: source → sample → images → clean.")

embedding_shards_job = dg.define_asset_job(
    "embedding_shards_job", selection=dg.AssetSelection.assets(clip_embedding_shards),
    partitions_def=clip_embedding_shards.partitions_def,
    description="Step 2: one embedding shard per run; backfill all partitions to spread them over processes/pods.")

curate_from_shards_job = dg.define_asset_job(
    "curate_from_shards_job",
    selection=dg.AssetSelection.assets(clip_embeddings_from_shards) | dg.AssetSelection.groups("curate", "evaluate"),
    description="Step 3: assemble the shards, curate, publish and evaluate.")

defs = dg.Definitions(
    assets=SHARDED_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[ingest_job, embedding_shards_job, curate_from_shards_job],
    sensors=SENSORS,
    resources=build_resources(),
    executor=dg.multiprocess_executor,
)
