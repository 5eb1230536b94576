"""Publication gate: every blocking check passed on the exact data the version was made from.

Why not rely on ``blocking=True`` alone: Dagster blocks downstream steps only inside the run where a check failed.
Re-executing just the publish step of a failed run (one click in the UI) has no checks in it, and in the sharded
location the clean checks run in an earlier run than the publication; both published a version whose blocking
check had failed. So the publish step reads the instance's check history itself.
"""
from __future__ import annotations

import dagster as dg

GATED_ASSETS = ("clean_products", "clip_embeddings", "curated_products")
_HISTORY = 50  # evaluations looked back through, per check


def unpassed_blocking_checks(instance: dg.DagsterInstance, version_runs: list[str]) -> list[str]:
    """Why the version may not be published: each blocking check of the gated assets must have passed on the
    materialization it was made from — curated_products from ``version_runs`` (the run that wrote the version and
    its re-executions), clean_products and clip_embeddings from their latest materialization. Empty: publish."""
    from ..checks import ALL_CHECKS  # (checks import this package)

    problems: list[str] = []
    specs = [s for c in ALL_CHECKS for s in c.check_specs if s.blocking]
    for asset in GATED_ASSETS:
        key = dg.AssetKey(asset)
        if asset == "curated_products":
            targets = set(version_runs)
        else:
            latest = instance.fetch_materializations(key, limit=1).records
            if not latest:  # made outside this instance's history (another instance): nothing to judge here
                continue
            targets = {latest[0].run_id}
        for spec in (s for s in specs if s.asset_key == key):
            verdict = None
            for record in instance.event_log_storage.get_asset_check_execution_history(spec.key, limit=_HISTORY):
                evaluation = record.evaluation
                target = evaluation.target_materialization_data if evaluation is not None else None
                if target is not None and target.run_id in targets:
                    verdict = evaluation.passed  # the most recent evaluation of that materialization
                    break
            if verdict is None:
                problems.append(f"{asset}: blocking check {spec.key.name} has not run on the data of run(s) "
                                f"{sorted(targets)}")
            elif not verdict:
                problems.append(f"{asset}: blocking check {spec.key.name} failed (run(s) {sorted(targets)})")
    return problems
