"""benchmarks/loadgen.py measures what it claims: open-loop latency from the due time (no coordinated omission),
closed-loop latency from the send, and every non-200 or short answer counted as an error, not a latency.

No assertion bounds a duration from above: the test server's sleeps are lower bounds on every latency, which a busy
machine can only lengthen, so the checks are lower bounds and orderings."""
from __future__ import annotations

import http.server
import importlib.util
import itertools
import json
import threading
import time
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("loadgen", Path(__file__).resolve().parents[1] / "benchmarks" / "loadgen.py")
loadgen = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(loadgen)

SERVICE_S = 0.05  # each request takes 50 ms: one connection serves at most 20 req/s
HOLD = threading.Event()  # a "hold" request is answered only once the test sets it


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["query"] == "hold":
            HOLD.wait(30)
        time.sleep(SERVICE_S)
        status, hits = (500, []) if body["query"] == "fail" else (200, [{}] * (1 if body["query"] == "short" else 3))
        out = json.dumps(hits).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Server-Timing", f"encode;dur={SERVICE_S * 1e3:.1f}")
        if body["query"] == "bye":
            self.send_header("Connection", "close")  # answered, then closed (as a server leaving keep-alive does)
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
    # cannot be answered before (i + 1) * 50 ms, so each latency is at least 40 ms more than the one before (a client
    # timing from the send would report ~50 ms for every one of them and hide the queue).
    out = loadgen.run("127.0.0.1", slow_server, _bodies([f"q{i}" for i in range(10)]), rate=100.0, connections=1,
                      expect_hits=3)
    lat = out["latencies_ms"]
    assert out["errors"] == [] and len(lat) == 10
    assert lat[0] >= SERVICE_S * 1e3
    assert all(b - a >= 39 for a, b in itertools.pairwise(lat))
    assert lat[-1] >= 10 * 50 - 9 * 10  # answered at >= 500 ms, due at 90 ms
    assert out["server_timing"][0] == "encode;dur=50.0"


def test_poisson_arrivals_keep_the_mean_rate_and_count_from_their_due_times(slow_server):
    due = loadgen.due_times(4000, 100.0, "poisson", seed=1)
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.01, rel=0.05)
    assert sum(g < 0.001 for g in gaps) > 0.05 * len(gaps)  # bursts: ~9.5% of gaps under 1 ms (exp. distribution)
    assert due == loadgen.due_times(4000, 100.0, "poisson", seed=1)  # reproducible
    with pytest.raises(ValueError, match="uniform or poisson"):
        loadgen.due_times(3, 1.0, "bursty")
    out = loadgen.run("127.0.0.1", slow_server, _bodies([f"q{i}" for i in range(6)]), rate=100.0, connections=1,
                      expect_hits=3, arrivals="poisson", seed=1)
    first = loadgen.due_times(6, 100.0, "poisson", seed=1)
    lat = out["latencies_ms"]
    assert out["errors"] == [] and len(lat) == 6
    # one connection, 50 ms each: request 5 is answered >= 300 ms after the start, and was due at first[5]
    assert lat[-1] >= 6 * 50 - first[5] * 1e3 - 1


def test_closed_loop_counts_latency_from_the_send(slow_server):
    # One connection: "hold" is answered only when released (>= 0.4 s); the next request is sent after that
    # answer, so its latency is its own ~50 ms, not the time it waited behind "hold" (as an open loop would count).
    HOLD.clear()
    threading.Timer(0.4, HOLD.set).start()
    out = loadgen.run("127.0.0.1", slow_server, _bodies(["hold", "q1", "q2"]), rate=None, connections=1,
                      expect_hits=3)
    lat = out["latencies_ms"]
    assert out["errors"] == [] and len(lat) == 3
    assert lat[0] >= 400
    assert lat[1] < lat[0] / 2 and lat[2] < lat[0] / 2
    assert out["wall_s"] * 1e3 >= 400 + 3 * 50


def test_the_no_answer_timeout_is_per_request_not_per_run(slow_server):
    # 8 answers of 50 ms on one connection take >= 0.4 s, longer than timeout_s: no request waits that long, so
    # none is an error (a run-wide deadline would call the last ones unanswered).
    out = loadgen.run("127.0.0.1", slow_server, _bodies([f"q{i}" for i in range(8)]), rate=None, connections=1,
                      expect_hits=3, timeout_s=0.25)
    assert out["errors"] == [] and len(out["latencies_ms"]) == 8


def test_connections_closed_while_idle_are_reopened(slow_server):
    # "bye" is answered with "Connection: close", then the server closes the connection: the next requests go out
    # on a new connection, not counted as errors.
    out = loadgen.run("127.0.0.1", slow_server, _bodies(["bye", "q1", "bye", "q2"]), rate=None, connections=1,
                      expect_hits=3)
    assert out["errors"] == [] and len(out["latencies_ms"]) == 4


def test_failures_are_errors_not_latencies(slow_server):
    out = loadgen.run("127.0.0.1", slow_server, _bodies(["ok", "fail", "short", "ok"]), rate=50.0, connections=2,
                      expect_hits=3)
    assert sorted(out["errors"]) == ["200", "500"]  # the 500, and the 200 with 1 hit instead of 3
    assert len(out["latencies_ms"]) == 2


def test_a_server_that_drops_every_request_is_reported():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = srv.server_address[1]
    stop = threading.Event()

    def accept_and_close():  # reads each request, answers nothing, closes
        while not stop.is_set():
            try:
                conn, _ = srv.socket.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    out = loadgen.run("127.0.0.1", port, _bodies(["a", "b", "c"]), rate=100.0, connections=1, expect_hits=3)
    stop.set()
    srv.server_close()
    assert len(out["errors"]) == 3 and not out["latencies_ms"]
    assert not any(e.startswith("unanswered") for e in out["errors"])  # each seen to fail, none waited out
