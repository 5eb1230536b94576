"""Helpers for tests/test_killed_run.py: a local alert webhook and reads of the instance's run/event/pool storage.

The test drives a real `dagster dev` (tests/e2e/dagster_ui.py) and reads the same DAGSTER_HOME from the test
process through DagsterInstance (SQLite storage can be read while the daemon writes it).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GPU_POOL = "gpu"
EMBED_STEP = "clip_embeddings"


class AlertWebhook:
    """A tiny HTTP server on 127.0.0.1 that records the JSON body of every POST (what CURATION_ALERT_WEBHOOK gets)."""

    def __init__(self):
        self.received: list[tuple[float, dict]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body or b"{}")
                except ValueError:
                    payload = {"unparsable": body.decode(errors="replace")}
                received.append((time.monotonic(), payload))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # keep pytest output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alert"
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-webhook", daemon=True)

    def __enter__(self) -> AlertWebhook:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def alert_for(self, run_id: str) -> tuple[float, dict] | None:
        return next(((t, p) for t, p in list(self.received) if p.get("run_id") == run_id), None)


def step_event(instance, run_id: str, event_type, step_key: str = EMBED_STEP):
    """The first event of `event_type` for `step_key` in the run, or None."""
    records = instance.get_records_for_run(run_id, of_type=event_type).records
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is not None and event.step_key == step_key:
            return event
    return None


def pool_claims(instance, pool: str = GPU_POOL) -> dict:
    """{'limit', 'claimed_by' (run ids holding a slot), 'pending' (run ids waiting)} for the pool."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    return {"limit": info.limit, "claimed_by": sorted(info.active_run_ids),
            "pending": sorted(info.pending_run_ids)}


def run_status(instance, run_id: str) -> str:
    run = instance.get_run_by_id(run_id)
    return run.status.value if run else "MISSING"


def sensor_tick_count(server, location: str, sensor: str, repository: str = "__repository__") -> int:
    """How many ticks the daemon has recorded for the sensor (0 until its first evaluation)."""
    data = server.graphql("""query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
        ... on Sensor { sensorState { status ticks(limit: 5) { id status } } } ... on PythonError { message } } }""",
                          {"s": {"repositoryLocationName": location, "repositoryName": repository,
                                 "sensorName": sensor}})
    node = data["sensorOrError"]
    if node["__typename"] != "Sensor":
        raise RuntimeError(f"sensor {sensor}: {node}")
    return len(node["sensorState"]["ticks"])
