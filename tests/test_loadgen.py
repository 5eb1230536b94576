"""benchmarks/loadgen.py measures what it claims: open-loop latency from the due time (no coordinated omission),
closed-loop latency from the send, and every non-200 or short answer counted as an error, not a latency."""
from __future__ import annotations

import http.server
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("loadgen", Path(__file__).resolve().parents[1] / "benchmarks" / "loadgen.py")
loadgen = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(loadgen)

SERVICE_S = 0.05  # each request takes 50 ms: one connection serves at most 20 req/s


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def do_POST(self):  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(SERVICE_S)
        status, hits = (500, []) if body["query"] == "fail" else (200, [{}] * (1 if body["query"] == "short" else 3))
        out = json.dumps(hits).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Server-Timing", f"encode;dur={SERVICE_S * 1e3:.1f}")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture()
def slow_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _bodies(queries):
    return [json.dumps({"query": q, "top_k": 3}).encode() for q in queries]


def test_open_loop_counts_latency_from_the_due_time(slow_server):
    # 10 requests offered at 100 req/s on one connection that serves 20 req/s: request i is due at i * 10 ms and
    # answered at ~(i + 1) * 50 ms, so its latency grows ~40 ms per request (a client timing from the send would
    # report ~50 ms for every one of them and hide the queue).
    out = loadgen.run("127.0.0.1", slow_server, _bodies([f"q{i}" for i in range(10)]), rate=100.0, connections=1,
                      expect_hits=3)
    lat = out["latencies_ms"]
    assert out["errors"] == [] and len(lat) == 10
    assert lat[0] == pytest.approx(50, abs=25)
    assert lat[-1] >= 9 * 40 + 40  # ~410 ms: the 9 requests ahead of it, served one after the other
    assert all(b > a for a, b in zip(lat, lat[1:]))
    assert out["server_timing"][0] == "encode;dur=50.0"


def test_closed_loop_counts_latency_from_the_send(slow_server):
    out = loadgen.run("127.0.0.1", slow_server, _bodies([f"q{i}" for i in range(8)]), rate=None, connections=2,
                      expect_hits=3)
    assert out["errors"] == [] and len(out["latencies_ms"]) == 8
    assert max(out["latencies_ms"]) < 2 * SERVICE_S * 1e3  # never waited for another request
    assert out["wall_s"] >= 4 * SERVICE_S  # 8 requests over 2 connections, one at a time each


def test_failures_are_errors_not_latencies(slow_server):
    out = loadgen.run("127.0.0.1", slow_server, _bodies(["ok", "fail", "short", "ok"]), rate=50.0, connections=2,
                      expect_hits=3)
    assert sorted(out["errors"]) == ["200", "500"]  # the 500, and the 200 with 1 hit instead of 3
    assert len(out["latencies_ms"]) == 2


def test_a_dead_server_is_reported_not_waited_for():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = srv.server_address[1]

    def accept_and_close():
        conn, _ = srv.socket.accept()
        conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = loadgen.run("127.0.0.1", port, _bodies(["a", "b", "c"]), rate=100.0, connections=1, expect_hits=3)
    srv.server_close()
    assert len(out["errors"]) == 3 and not out["latencies_ms"]
    assert time.perf_counter() - t0 < 10
