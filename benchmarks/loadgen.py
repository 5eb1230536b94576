"""A lean open-loop HTTP/1.1 load generator (wrk2-style) for the search benchmark.

Why: a Python load generator on the server's own 2 cores is part of what it measures. The threaded httpx client
costs ~1.1 ms of CPU per request and, with 16 threads contending for one GIL, adds its own waits to the latency it
reports. This one runs in its own process, one thread, plain non-blocking sockets and pre-built request bytes
(~0.1-0.2 ms per request): request i falls due at t0 + i / rate and is sent on the first idle connection; its
latency counts from the due time (no coordinated omission: a request waiting for a free connection is waiting).

Run it in its own process (``python benchmarks/loadgen.py --port P --requests N [--connections 16] [--rate R]``,
``--rate 0``: closed loop); it prints one JSON object: latencies (ms), each response's Server-Timing, errors, and
the CPU seconds it used.
"""
from __future__ import annotations

import json
import selectors
import socket
import sys
import time
from collections import deque
from pathlib import Path


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Conn:
    __slots__ = ("sock", "buf", "due", "busy", "dead")

    def __init__(self, sock: socket.socket):
        self.sock, self.buf, self.due, self.busy, self.dead = sock, b"", 0.0, False, False


def _parse(buf: bytes) -> tuple[int, dict[str, str], bytes, bytes] | None:
    """One complete response off the front of ``buf``: (status, headers, body, rest), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    if len(buf) < end + 4 + n:
        return None
    return status, headers, buf[end + 4:end + 4 + n], buf[end + 4 + n:]


def run(host: str, port: int, bodies: list[bytes], rate: float | None, connections: int, path: str = "/search",
        expect_hits: int | None = None, timeout_s: float = 60.0) -> dict:
    """Send every body once. ``rate`` > 0: open loop, request i due at t0 + i / rate, latency from its due time.
    ``rate`` None or 0: closed loop, each connection sends its next request when the last is answered, latency
    from the send."""
    reqs = [build_request(host, port, path, b) for b in bodies]
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = _Conn(s)
        sel.register(s, selectors.EVENT_READ, c)
        conns.append(c)
    idle = deque(conns)
    pending: deque[tuple[int, float]] = deque()  # (request index, due time) waiting for an idle connection
    lat: list[float] = []
    timings: list[str] = []
    errors: list[str] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.05
    total = len(reqs)
    nxt, done, live = 0, 0, len(conns)
    deadline = t0 + (total / rate if rate else 0) + timeout_s
    while done < total:
        now = time.perf_counter()
        if now > deadline or not live:
            errors.extend([f"unanswered ({'deadline' if live else 'no connection left'})"] * (total - done))
            break
        if rate:
            while nxt < total and t0 + nxt / rate <= now:
                pending.append((nxt, t0 + nxt / rate))
                nxt += 1
        else:
            while nxt < total and len(pending) < len(idle):
                pending.append((nxt, 0.0))
                nxt += 1
        while pending and idle:
            c = idle.popleft()
            if c.dead:
                continue
            i, due = pending.popleft()
            c.due, c.busy = (due or time.perf_counter()), True
            try:
                c.sock.setblocking(True)  # a small request: one send, kept whole
                c.sock.sendall(reqs[i])
                c.sock.setblocking(False)
            except OSError as exc:
                errors.append(f"send failed: {exc}")
                done += 1
                c.busy, c.dead = False, True
                sel.unregister(c.sock)
                live -= 1
        # Sleep until the next request falls due, or (no idle connection: a due request could not be sent anyway,
        # and its latency counts from its due time regardless) until a response arrives; never spin.
        wait = (t0 + nxt / rate - time.perf_counter()) if rate and nxt < total and any(not c.dead for c in idle) else 0.05
        for key, _ in sel.select(max(0.0, min(wait, 0.05))):
            c = key.data
            try:
                chunk = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                chunk, why = b"", str(exc)
            else:
                why = "connection closed by the server"
            if not chunk:
                sel.unregister(c.sock)
                live -= 1
                c.dead = True
                if c.busy:
                    errors.append(why)
                    done += 1
                    c.busy = False
                continue
            c.buf += chunk
            parsed = _parse(c.buf)
            if parsed is None:
                continue
            t_done = time.perf_counter()
            status, headers, body, c.buf = parsed
            ok = status == 200
            if ok and expect_hits is not None:
                ok = len(json.loads(body)) == expect_hits
            if ok:
                lat.append((t_done - c.due) * 1e3)
                timings.append(headers.get("server-timing", ""))
            else:
                errors.append(str(status))
            done += 1
            c.busy = False
            idle.append(c)
    wall = time.perf_counter() - t0
    for c in conns:
        c.sock.close()
    return {"latencies_ms": lat, "server_timing": timings, "errors": errors, "wall_s": wall,
            "cpu_s": time.process_time() - cpu0, "connections": connections, "offered_rate": rate or None}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s offered (open loop); 0: closed loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=10)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np

    from bench_search import random_query

    rng = np.random.default_rng(a.seed)  # distinct queries, as the threaded client sends them: no cache can help
    bodies = [json.dumps({"query": random_query(rng) + f" {i}", "top_k": a.top_k}).encode() for i in range(a.requests)]
    out = run(a.host, a.port, bodies, a.rate, a.connections, expect_hits=a.top_k)
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
