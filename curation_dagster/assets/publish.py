"""published_curated_version: the only step that moves `curated/CURRENT`.

It runs after curated_products' blocking checks (a failed check stops it; and it reads the check history itself, so a
re-executed publish step or a later run never publishes data whose check failed: _check_gate), takes the version
this run wrote, refuses
it below the publish floor (an empty or gutted version would otherwise replace a good one in the API), then
publishes it atomically and prunes old versions.
"""
import dagster as dg
import polars as pl
from pydantic import Field

from ..core.artifacts import PublishFloor, PublishRefused, publish_version
from ..resources import CurationPaths
from ._check_gate import unpassed_blocking_checks
from ._run_version import lineage, moved_version_name, staged_version_name


class PublishConfig(dg.Config):
    min_rows: int = Field(default=PublishFloor.min_rows, description="Never publish a version with fewer rows.")
    min_kept_fraction: float = Field(
        default=PublishFloor.min_kept_fraction,
        description="Never publish a version that keeps less than this fraction of the run's clean rows.")
    keep_versions: int = Field(default=5, description="Published versions kept on disk for rollback.")


@dg.asset(
    group_name="curate", kinds={"polars"}, deps=["curated_products"],
    description="Publishes this run's curated version (moves it next to the served versions and switches "
                "`$CURATION_ARTIFACTS_DIR/curated/CURRENT` atomically; the API picks it up) once every blocking "
                "check on curated_products has passed and the version is above the publish floor. One row: what "
                "was published.")
def published_curated_version(context: dg.AssetExecutionContext, config: PublishConfig,
                              paths: CurationPaths) -> dg.Output[pl.DataFrame]:
    name = staged_version_name(context.run, paths.artifacts) or moved_version_name(context.run, paths.artifacts)
    if name is None:
        raise dg.Failure(f"run {context.run_id} wrote no curated version to publish: materialize curated_products "
                         "in the same run")
    problems = unpassed_blocking_checks(context.instance, lineage(context.run))
    if problems:
        raise dg.Failure(f"curated version {name} is not published: " + "; ".join(problems)
                         + ". Fix the data or the settings and run the graph (with its checks) again.",
                         metadata={"version": name, "checks": dg.MetadataValue.json(problems)}, allow_retries=False)
    floor = PublishFloor(min_rows=config.min_rows, min_kept_fraction=config.min_kept_fraction)
    try:
        info = publish_version(paths.artifacts, name, keep_versions=config.keep_versions, floor=floor)
    except PublishRefused as exc:
        raise dg.Failure(str(exc), metadata={"version": name, "floor": dg.MetadataValue.json(
            {"min_rows": floor.min_rows, "min_kept_fraction": floor.min_kept_fraction})}) from exc
    context.log.info(f"published curated version {info.version} ({info.count} records) at {info.path}; "
                     f"curated/CURRENT now names it" + (f"; pruned {list(info.pruned)}" if info.pruned else ""))
    row = pl.DataFrame({"version": [info.version], "path": [str(info.path)], "count": [info.count],
                        "dim": [info.dim], "run_id": [context.run_id]})
    return dg.Output(row, metadata={
        "version": dg.MetadataValue.text(info.version),
        "artifact_path": dg.MetadataValue.path(str(info.path)),
        "records": dg.MetadataValue.int(info.count),
        "pruned_versions": dg.MetadataValue.json(list(info.pruned)),
    })
