"""The product as a user meets it: `dagster dev` in a real browser (headless system Chromium).

Starts `dagster dev` with the tiny-random CLIP on a fresh instance, checks the asset graph, materializes
`curation_job` end to end, and takes screenshots: into a temp dir by default (running the tests never changes a
tracked file); with UPDATE_SCREENSHOTS=1 into docs/screenshots/, the pictures README.md shows.
Skipped, with the reason, when Chromium/chromedriver is not installed or cannot start.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from .dagster_ui import (
    BrowserUnavailable, close_dialog, dagster_dev, decoded_images, defined_asset_checks, format_errors,
    latest_materialization_metadata, launch_job, open_lineage, open_markdown_metadata, run_events, screenshot, show,
    skip_first_visit_dialog, start_chromium, wait_for_run, workspace_location,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MAIN_ASSETS = ["raw_products", "sampled_products", "product_images", "clean_products", "clip_embeddings",
               "curated_products", "published_curated_version", "evaluation_report"]
SIDE_ASSETS = ["raw_rejections", "clean_rejections", "curation_removals"]
# Short evaluation: one seed, one feature set, few boosting rounds (the default is 3 seeds x 3 feature sets, 500
# rounds); the report's numbers are meaningless with tiny-random anyway.
RUN_CONFIG = {"ops": {"evaluation_report": {"config": {"seeds": [0], "modalities": ["image+text"],
                                                       "num_boost_round": 50}}}}
RUN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    except BrowserUnavailable as exc:
        pytest.skip(f"browser e2e test skipped: {exc}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dagster-e2e")


@pytest.fixture(scope="module")
def shots(root) -> Path:
    """Where screenshots go: README's docs/screenshots/ only on explicit opt-in (UPDATE_SCREENSHOTS=1)."""
    if os.environ.get("UPDATE_SCREENSHOTS", "").strip() == "1":
        return REPO / "docs" / "screenshots"
    return root / "screenshots"


@pytest.fixture(scope="module")
def server(root, browser):
    """`dagster dev` on a fresh DAGSTER_HOME / artifacts dir; the browser fixture comes first so a missing
    Chromium skips before paying for the server start."""
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(home),
        "CURATION_ARTIFACTS_DIR": str(root / "artifacts"),
        "CURATION_DATA_DIR": str(REPO / "data" / "sample"),
        "CURATION_CLIP_MODEL": "tiny-random",
        "CURATION_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    })
    # OpenMP threads (LightGBM, torch) that busy-wait slow down by 10x or more when the cores are shared with the
    # browser, the webserver and the daemon; passive waiting keeps the run short on a 2-core runner.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("CURATION_ALERT_WEBHOOK", None)
    if os.environ.get("CURATION_MODEL_CACHE"):  # tests/conftest.py gives each session its own
        env["CURATION_MODEL_CACHE"] = os.environ["CURATION_MODEL_CACHE"]
    with dagster_dev(REPO, env, root / "dagster_dev.log") as srv:
        srv.location = workspace_location(srv)  # waits until the code location has loaded
        skip_first_visit_dialog(srv)
        yield srv


@pytest.fixture(scope="module")
def finished_run(server):
    """curation_job launched over GraphQL (as the UI's Launchpad would) and waited for; fails with its errors."""
    started = time.monotonic()
    run_id = launch_job(server, server.location, "curation_job", RUN_CONFIG)
    status = wait_for_run(server, run_id, RUN_TIMEOUT_S)
    seconds = time.monotonic() - started
    events = run_events(server, run_id)
    print(f"\ncuration_job run {run_id}: {status} in {seconds:.1f}s")
    if status != "SUCCESS":
        pytest.fail(f"curation_job run {run_id} ended {status}:\n{format_errors(events)}\n"
                    f"--- dagster dev log ---\n{server.log_tail(30)}")
    return {"run_id": run_id, "seconds": seconds, "events": events}


def test_a_missing_browser_is_a_skip_reason_not_a_pass(monkeypatch, tmp_path):
    """The fixture turns BrowserUnavailable into pytest.skip(reason): the reason must name what is missing."""
    monkeypatch.setenv("E2E_CHROMEDRIVER", str(tmp_path / "no-chromedriver"))
    with pytest.raises(BrowserUnavailable, match="no-chromedriver.*missing"):
        start_chromium(tmp_path / "profile")
    monkeypatch.setenv("E2E_CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(BrowserUnavailable, match="no-chromium"):
        start_chromium(tmp_path / "profile")


def test_asset_graph_shows_every_asset(browser, server, shots):
    text = open_lineage(browser, server.base_url, MAIN_ASSETS + SIDE_ASSETS)
    for group in ("ingest", "embed", "curate", "evaluate"):
        assert group in text
    screenshot(browser, shots / "asset_graph.png")


def test_materialize_everything_and_inspect_it_in_the_ui(browser, server, root, finished_run, shots):
    run_id = finished_run["run_id"]

    # Every defined asset check ran in this run and passed.
    evaluations = [e["evaluation"] for e in finished_run["events"] if e["__typename"] == "AssetCheckEvaluationEvent"]
    evaluated = {("/".join(c["assetKey"]["path"]), c["checkName"]) for c in evaluations}
    defined = defined_asset_checks(server)
    assert defined and evaluated == defined, (defined, evaluated)
    assert all(c["success"] for c in evaluations), [c for c in evaluations if not c["success"]]
    materialized = {"/".join(e["assetKey"]["path"]) for e in finished_run["events"]
                    if e["__typename"] == "MaterializationEvent"}
    assert materialized == set(MAIN_ASSETS + SIDE_ASSETS)

    # The run page: every step succeeded.
    show(browser, f"{server.base_url}/runs/{run_id}", [run_id[:8], "Success", "curation_job", "RUN_SUCCESS"],
         "the run page", height=1000)
    screenshot(browser, shots / "run.png")

    # The lineage graph again, now with every asset materialized and its checks passed.
    open_lineage(browser, server.base_url, MAIN_ASSETS + SIDE_ASSETS)
    screenshot(browser, shots / "asset_graph_materialized.png")

    # curated_products: the metadata the UI shows is the published artifact's.
    meta = latest_materialization_metadata(server, "curated_products")
    for key in ("version", "rows_in", "rows_curated", "removed_misaligned", "removed_duplicate", "kept_fraction",
                "alignment_histogram"):
        assert key in meta, sorted(meta)
    assert int(meta["rows_in"]) == int(meta["rows_curated"]) + int(meta["removed_misaligned"]) \
        + int(meta["removed_duplicate"])
    version = meta["version"]
    assert (root / "artifacts" / "curated" / "CURRENT").read_text().strip() == version
    show(browser, f"{server.base_url}/assets/curated_products",
         ["curated_products", "Metadata", "rows_curated", "removed_duplicate", version, "Latest materialization"],
         "curated_products' metadata", height=1400)
    screenshot(browser, shots / "curated_products.png")
    dialog = open_markdown_metadata(browser, "alignment_histogram")
    images = decoded_images(browser, dialog)
    assert len(images) == 1 and images[0][1] > 0, images  # the inline PNG decoded in the browser
    screenshot(browser, shots / "curated_products_alignment_histogram.png")
    close_dialog(browser, dialog)

    # evaluation_report: the verdict and the report table.
    report = latest_materialization_metadata(server, "evaluation_report")
    assert report["curated_version"] == version
    assert report["verdict"]
    show(browser, f"{server.base_url}/assets/evaluation_report",
         ["evaluation_report", "Metadata", "verdict", "curated_version", version], "evaluation_report's metadata",
         height=1400)
    screenshot(browser, shots / "evaluation_report.png")
    plots = sorted(k for k in report if k.startswith("plot_"))
    assert "plot_metrics_plot" in plots, sorted(report)
    for key in plots:
        dialog = open_markdown_metadata(browser, key)
        images = decoded_images(browser, dialog)
        assert len(images) == 1 and images[0][1] > 0, (key, images)
        if key == "plot_metrics_plot":
            screenshot(browser, shots / "evaluation_report_metrics_plot.png")
        close_dialog(browser, dialog)
