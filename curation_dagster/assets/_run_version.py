"""Which curated version belongs to the run in hand.

Checks, publication and evaluation each read *this run's* version by name (the run id is part of the version
name), never CURRENT: two runs in flight at once must not check, publish or evaluate each other's version.
A re-execution of a failed run looks in its parent and root run too (they wrote the version it resumes).
"""
from __future__ import annotations

import dagster as dg

from ..core.artifacts import CuratedVersion, load_staged_version, load_version, versions_of_run


def lineage(run: dg.DagsterRun) -> list[str]:
    """The run, its parent and its root: the runs whose curated version a re-execution resumes."""
    ids = [run.run_id, run.parent_run_id, run.root_run_id]
    return list(dict.fromkeys(i for i in ids if i))


def staged_version_name(run: dg.DagsterRun, artifacts) -> str | None:
    for run_id in lineage(run):
        names = versions_of_run(artifacts, run_id, staged=True)
        if names:
            return names[-1]
    return None


def moved_version_name(run: dg.DagsterRun, artifacts) -> str | None:
    """This run's version already moved next to the published ones: a publish that failed after the move (killed,
    disk full while writing CURRENT) is resumed by a re-execution instead of stranding it."""
    for run_id in lineage(run):
        names = versions_of_run(artifacts, run_id, staged=False)
        if names:
            return names[-1]
    return None


def this_runs_staged_version(run: dg.DagsterRun, artifacts) -> CuratedVersion:
    name = staged_version_name(run, artifacts)
    if name is None:
        raise dg.Failure(f"run {run.run_id} has no unpublished curated version: materialize curated_products in "
                         "the same run")
    return load_staged_version(artifacts, name)


def this_runs_published_version(run: dg.DagsterRun, artifacts) -> CuratedVersion | None:
    for run_id in lineage(run):
        names = versions_of_run(artifacts, run_id, staged=False)
        if names:
            return load_version(artifacts, names[-1])
    return None
