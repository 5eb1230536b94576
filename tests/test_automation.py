"""Definitions load; the schedule, the source sensor and the failure alert behave as documented."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg

from curation_dagster import automation
from curation_dagster.definitions import defs


def test_definitions_resolve_everything():
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"raw_products", "sampled_products", "product_images", "clean_products", "clip_embeddings",
            "curated_products", "evaluation_report"} <= keys
    assert defs.resolve_job_def("curation_job") is not None
    assert defs.get_schedule_def("daily_curation").cron_schedule == automation.DEFAULT_CRON
    assert {s.name for s in repo.sensor_defs} == {"source_files_sensor", "curation_failure_alert"}
    checks = {k.name for k in repo.asset_graph.asset_check_keys}
    assert {"clean_counts_add_up", "embeddings_valid", "curated_no_duplicates_left", "curated_counts_add_up"} <= checks
    for key in keys:  # every asset tells its story in the UI
        node = repo.asset_graph.get(dg.AssetKey(key))
        assert node.description and node.group_name != "default", key


def test_schedule_yields_a_run_request():
    ctx = dg.build_schedule_context(scheduled_execution_time=None)
    result = automation.daily_curation.evaluate_tick(ctx)
    assert len(result.run_requests) == 1
    assert result.run_requests[0].job_name in (None, "curation_job")


def test_source_sensor_requests_only_on_change(tmp_path, monkeypatch, sample_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data, ignore=shutil.ignore_patterns("images"))
    (data / "images" / "image_train").mkdir(parents=True)
    from curation_dagster.resources import CurationPaths

    paths = CurationPaths(data_dir=str(data), artifacts_dir=str(tmp_path / "artifacts"))

    def ctx_with(cursor):
        return dg.build_sensor_context(cursor=cursor, resources={"paths": paths})

    ctx = ctx_with(None)
    first = automation.source_files_sensor(ctx)
    assert isinstance(first, dg.RunRequest)
    cursor = ctx.cursor
    assert json.loads(cursor)["n_files"] > 0

    ctx = ctx_with(cursor)
    unchanged = automation.source_files_sensor(ctx)
    assert isinstance(unchanged, dg.SkipReason) and ctx.cursor == cursor

    (data / "X_new.csv").write_text(",designation,description,productid,imageid\n")
    ctx = ctx_with(cursor)
    changed = automation.source_files_sensor(ctx)
    assert isinstance(changed, dg.RunRequest) and changed.run_key != first.run_key
    assert "X_new.csv" in changed.tags["curation/change"]

    ctx2 = ctx_with(ctx.cursor)
    assert isinstance(automation.source_files_sensor(ctx2), dg.SkipReason)


class _Collector(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_failure_sensor_posts_webhook(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(automation.ALERT_WEBHOOK_ENV, f"http://127.0.0.1:{server.server_port}/hook")

        @dg.op
        def boom():
            raise RuntimeError("planted failure")

        @dg.job
        def failing_job():
            boom()

        instance = dg.DagsterInstance.ephemeral()
        result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE"
                       or e.event_type_value == "RUN_FAILURE")
        ctx = dg.build_run_status_sensor_context(sensor_name="curation_failure_alert", dagster_event=failure,
                                                 dagster_instance=instance,
                                                 dagster_run=result.dagster_run).for_run_failure()
        _Collector.received.clear()
        automation.curation_failure_alert(ctx)
        assert len(_Collector.received) == 1
        alert = _Collector.received[0]
        assert alert["event"] == "dagster_run_failed" and alert["run_id"] == result.run_id
        assert alert["job"] == "failing_job"
    finally:
        server.shutdown()
