"""Helpers shared by test modules (importable: tests/ is on sys.path through the root conftest)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"


SIDE_TABLES = ("raw_rejections", "clean_rejections", "curation_removals")


def up_to_publication():
    """Every asset up to and including publication, with the side tables the checks read (the multi-assets are
    subsettable, so their other outputs are not pulled in by themselves)."""
    import dagster as dg

    return dg.AssetSelection.assets("published_curated_version").upstream() | dg.AssetSelection.assets(*SIDE_TABLES)


FAST_EVAL = {"seeds": [0], "modalities": ["image+text"], "num_boost_round": 60}


def materialize_all(data_dir: Path, artifacts_dir: Path, *, run_config: dict | None = None, selection=None,
                    instance=None, model: str = "tiny-random", run_lease: str = "process"):
    """The whole graph through Dagster's materialize(), with a tiny random model (tiny-random by default, or
    tiny-random-siglip) and a fast evaluation."""
    import dagster as dg

    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    # (run config for an unselected asset is an error, so the fast evaluation is only set for full runs)
    config = {"ops": {"evaluation_report": {"config": dict(FAST_EVAL)}}} if selection is None else {"ops": {}}
    for op, cfg in (run_config or {}).get("ops", {}).items():
        config["ops"].setdefault(op, {"config": {}})["config"].update(cfg["config"])
    resources = build_resources(data_dir=str(data_dir), artifacts_dir=str(artifacts_dir), model=model,
                                device="cpu", run_lease=run_lease)
    return dg.materialize([*ASSETS, *ALL_CHECKS], resources=resources, run_config=config, selection=selection,
                          instance=instance, raise_on_error=True)
