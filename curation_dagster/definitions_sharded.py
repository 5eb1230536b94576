"""Opt-in sharded variant of the code location: clip_embeddings is assembled from a partitioned shard asset.

`dagster dev -m curation_dagster.definitions_sharded`, then backfill `clip_embedding_shards` (all partitions: one
process each with the multiprocess executor, one pod each with dagster-k8s) and materialize the rest. Everything
else (assets, checks, IO, artifact) is the same as in curation_dagster.definitions.

Executor: the multiprocess executor by default. ``CURATION_EXECUTOR=celery`` runs every step as a task on celery
workers (``pip install -e '.[celery]'``; broker/result backend from ``CURATION_CELERY_BROKER`` /
``CURATION_CELERY_BACKEND``; a persistent instance shared with the workers, i.e. dagster_home/dagster.postgres.yaml).
See docs/deploy.md "One machine + celery workers".
"""
import os

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

# A worker holds at most one step (prefetch 1) and acknowledges it when done (acks late): a queued shard goes to an
# idle worker, not behind a busy one, and a shard whose worker dies is redelivered.
CELERY_CONFIG_SOURCE = {"worker_prefetch_multiplier": 1, "task_acks_late": True}


# Kubernetes (CURATION_EXECUTOR=k8s, `pip install -e '.[k8s]'`): one pod per step; the shard steps get a GPU pod.
# docs/deploy.md shows these two dicts verbatim (tests/test_scale_out.py checks that, and that dagster-k8s accepts them).
GPU_STEP_K8S_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1", "memory": "16Gi"},
                                       "requests": {"cpu": "4", "memory": "12Gi"}}},
    "pod_spec_config": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}
K8S_EXECUTOR_CONFIG = {"max_concurrent": 8,
                       "per_step_k8s_config": {"clip_embedding_shards": GPU_STEP_K8S_CONFIG,
                                               "clip_embeddings": GPU_STEP_K8S_CONFIG}}


def select_executor(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor named by ``CURATION_EXECUTOR``: ``multiprocess`` (the default), ``celery`` or ``k8s``."""
    name = (name if name is not None else os.environ.get("CURATION_EXECUTOR", "")).strip().lower() or "multiprocess"
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "celery":
        try:
            from dagster_celery import celery_executor
        except ImportError as exc:
            raise ImportError("CURATION_EXECUTOR=celery needs dagster-celery: pip install -e '.[celery]'") from exc
        return celery_executor.configured({
            "broker": {"env": "CURATION_CELERY_BROKER"},
            "backend": {"env": "CURATION_CELERY_BACKEND"},
            "config_source": CELERY_CONFIG_SOURCE,
        }, name="celery")
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as exc:
            raise ImportError("CURATION_EXECUTOR=k8s needs dagster-k8s: pip install -e '.[k8s]'") from exc
        return k8s_job_executor.configured(K8S_EXECUTOR_CONFIG, name="k8s")
    raise ValueError(f"CURATION_EXECUTOR={name!r}: expected 'multiprocess', 'celery' or 'k8s'")


defs = dg.Definitions(
    assets=SHARDED_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[ingest_job, embedding_shards_job, curate_from_shards_job],
    sensors=SENSORS,
    resources=build_resources(run_lease="run"),  # steps of one run in many processes, shard runs side by side
    executor=select_executor(),
)
