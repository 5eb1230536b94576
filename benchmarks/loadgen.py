"""A lean open-loop HTTP/1.1 load generator (wrk2-style) for the search benchmark.

Why: a Python load generator on the server's own 2 cores is part of what it measures. The threaded httpx client
costs ~1.1 ms of CPU per request and, with 16 threads contending for one GIL, adds its own waits to the latency it
reports. This one runs in its own process, one thread, plain non-blocking sockets and pre-built request bytes
(~0.1-0.2 ms per request): each request falls due at a fixed time (evenly spaced, or a Poisson process) and is
sent on the first idle connection; its latency counts from the due time (no coordinated omission: a request waiting for a free connection is waiting).

Run it in its own process (``python benchmarks/loadgen.py --port P --requests N [--connections 16] [--rate R]``,
``--rate 0``: closed loop); it prints one JSON object: latencies (ms), each response's Server-Timing, errors, and
the CPU seconds it used.
"""
from __future__ import annotations

import json
import os
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
    __slots__ = ("buf", "busy", "dead", "due", "sock")

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf, self.due, self.busy, self.dead = b"", 0.0, False, False


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


def due_times(n: int, rate: float, arrivals: str = "uniform", seed: int = 0) -> list[float]:
    """Seconds after the start at which each request falls due: evenly spaced (``uniform``), or a Poisson process
    (``poisson``: exponential gaps, the arrivals of many independent users; bursts and lulls at the same mean rate)."""
    if arrivals == "uniform":
        return [i / rate for i in range(n)]
    if arrivals == "poisson":
        import random

        rng, t, out = random.Random(seed), 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(rate)
        return out
    raise ValueError(f"arrivals must be uniform or poisson, not {arrivals!r}")


def run(host: str, port: int, bodies: list[bytes], rate: float | None, connections: int, path: str = "/search",
        expect_hits: int | None = None, timeout_s: float = 60.0, arrivals: str = "uniform", seed: int = 0) -> dict:
    """Send every body once. ``rate`` > 0: open loop, request i due at ``due_times(...)[i]`` after the start, its
    latency counted from then. ``rate`` None or 0: closed loop, each connection sends its next request when the last
    is answered, latency from the send. A connection the server closes after an answer ("Connection: close") or
    while idle is reopened when next used; one closed with a request on it is an error (not retried: a server that
    drops requests shows). Gives up after ``timeout_s`` without any answer."""
    reqs = [build_request(host, port, path, b) for b in bodies]
    total = len(reqs)
    due_at = due_times(total, rate, arrivals, seed) if rate else None
    sel = selectors.DefaultSelector()

    def open_conn() -> _Conn:
        c = _Conn(host, port)
        sel.register(c.sock, selectors.EVENT_READ, c)
        return c

    def drop(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        c.dead = True

    conns = [open_conn() for _ in range(connections)]
    idle = deque(conns)
    pending: deque[tuple[int, float]] = deque()  # (request index, due time) waiting for an idle connection
    lat: list[float] = []
    lag: list[float] = []  # open loop: how late each request went out (waiting for a connection, or this process)
    timings: list[str] = []
    errors: list[str] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.05
    nxt, done, in_flight = 0, 0, 0
    last_progress = t0
    while done < total:
        now = time.perf_counter()
        if in_flight and now - last_progress > timeout_s:
            errors.extend([f"unanswered: no response for {timeout_s:g} s"] * (total - done))
            break
        if due_at is not None:
            while nxt < total and t0 + due_at[nxt] <= now:
                pending.append((nxt, t0 + due_at[nxt]))
                nxt += 1
        else:
            while nxt < total and len(pending) < len(idle):
                pending.append((nxt, 0.0))
                nxt += 1
        while pending and idle:
            c = idle.popleft()
            if c.dead:  # closed by the server while idle: reopen
                try:
                    c = open_conn()
                except OSError as exc:
                    pending.popleft()
                    errors.append(f"connect failed: {exc}")
                    done += 1
                    idle.append(c)
                    continue
            i, due = pending.popleft()
            sent = time.perf_counter()
            c.due, c.busy = (due or sent), True
            if due:
                lag.append((sent - due) * 1e3)
            try:
                c.sock.setblocking(True)  # a small request: one send, kept whole
                c.sock.sendall(reqs[i])
                c.sock.setblocking(False)
                in_flight += 1
            except OSError as exc:
                errors.append(f"send failed: {exc}")
                done += 1
                c.busy = False
                drop(c)
                idle.append(c)
        # Sleep until the next request falls due, or (no idle connection: a due request could not be sent anyway,
        # and its latency counts from its due time regardless) until a response arrives; never spin.
        wait = (t0 + due_at[nxt] - time.perf_counter()) if due_at is not None and nxt < total and idle else 0.05
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
                if c.busy:
                    errors.append(why)
                    done += 1
                    in_flight -= 1
                    c.busy = False
                    last_progress = time.perf_counter()
                    idle.append(c)
                drop(c)
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
            in_flight -= 1
            last_progress = t_done
            c.busy = False
            if headers.get("connection", "").lower() == "close":
                drop(c)  # reopened when next used
            idle.append(c)
    wall = time.perf_counter() - t0
    for c in conns + list(idle):
        if not c.dead:
            c.sock.close()
    return {"latencies_ms": lat, "send_lag_ms": lag, "server_timing": timings, "errors": errors, "wall_s": wall,
            "cpu_s": time.process_time() - cpu0, "connections": connections, "offered_rate": rate or None,
            "arrivals": arrivals if rate else "closed loop"}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s offered (open loop); 0: closed loop")
    ap.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform",
                    help="open loop: evenly spaced requests, or a Poisson process at the same mean rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--nice", type=int, default=0, help="os.nice() increment for this process (negative: needs root)")
    a = ap.parse_args()
    if a.nice:
        os.nice(a.nice)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    from bench_search import random_query

    rng = np.random.default_rng(a.seed)  # distinct queries, as the threaded client sends them: no cache can help
    bodies = [json.dumps({"query": random_query(rng) + f" {i}", "top_k": a.top_k}).encode() for i in range(a.requests)]
    out = run(a.host, a.port, bodies, a.rate, a.connections, expect_hits=a.top_k, arrivals=a.arrivals, seed=a.seed)
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
