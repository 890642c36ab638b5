"""The inference endpoint under abuse, shared by tests/unit/agent/test_serve_abuse.py and
bench/endpoint_abuse.py: a real endpoint in its own process (so its RSS is its own), slow clients,
and concurrent large JSON bodies, all over real loopback sockets.

``python -m tests.serve_abuse MODEL.onnx '{"max_connections": 16, ...}'`` serves MODEL (input
``x`` [batch, 64] FP32) on a free loopback port, prints the port, and stops when stdin closes.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def _serve(model: str, serve: dict[str, Any]) -> None:
    from agent.config import ServeConfig
    from agent.runtime import load_session
    from agent.serve.holder import Loaded, SessionHolder
    from agent.serve.http import Endpoint
    from agent.service import trim_memory
    from agent.telemetry.latency import LatencyRecorder

    holder = SessionHolder()
    holder.swap(Loaded("tiny", "1", "0" * 64, "onnxruntime", load_session("onnxruntime", model)))
    ep = Endpoint(ServeConfig(**{"port": 0, **serve}), holder, LatencyRecorder())
    ep.start()
    trim_memory()  # start from the agent's own baseline (it trims after start-up)
    print(ep.address.rsplit(":", 1)[1], flush=True)
    sys.stdin.read()  # until the parent closes it
    ep.stop()


class Server:
    """The endpoint in a child process; ``rss_mb`` reads its resident memory."""

    def __init__(self, model: Path, **serve: Any) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.serve_abuse", str(model), json.dumps(serve)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def rss_mb(self) -> float:
        import psutil

        return float(psutil.Process(self.proc.pid).memory_info().rss) / MiB

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def infer_body(rows: int = 1) -> bytes:
    data = [0.5] * (rows * 64)
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": data}]}
    ).encode()


def large_body(size: int) -> bytes:
    """A valid infer request of about ``size`` bytes of JSON numbers: the costliest to parse."""
    rows = max(1, (size - 200) // (64 * 5))  # "0.5, " is five bytes a number
    return infer_body(rows)


def request(port: int, body: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    """POST an infer request on a new connection: (status, headers); 0 when the connection failed."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v2/models/tiny/infer", body=body)
        r = c.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    except OSError as exc:  # the reason, for the test's message
        return 0, {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        c.close()


def slow_clients(port: int, n_slow: int, n_legit: int, hold_s: float = 2.0) -> dict[str, Any]:
    """``n_slow`` clients hold connections (connect, send part of a head, a byte every ``hold_s``;
    reconnect at once when dropped) while ``n_legit`` requests are made one after another."""
    stop = threading.Event()
    dropped = [0]

    def slow() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=hold_s) as s:
                    s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\n")
                    while not stop.is_set():
                        s.sendall(b"X")
                        try:
                            if s.recv(4096) == b"":
                                break
                        except TimeoutError:
                            pass
            except OSError:
                pass
            dropped[0] += 1

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(n_slow)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # they hold every slot
    body, ok, statuses = infer_body(), 0, dict[int, int]()
    t0 = time.monotonic()
    lat = []
    for _ in range(n_legit):
        t1 = time.monotonic()
        status, _ = request(port, body, timeout=5)
        lat.append(time.monotonic() - t1)
        statuses[status] = statuses.get(status, 0) + 1
        ok += status == 200
    took = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(hold_s + 2)
    lat.sort()
    return {
        "slow_clients": n_slow,
        "legit_requests": n_legit,
        "legit_ok": ok,
        "legit_success_rate": round(ok / n_legit, 4),
        "legit_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "legit_p50_ms": round(lat[len(lat) // 2] * 1000, 2),
        "legit_max_ms": round(lat[-1] * 1000, 2),
        "seconds": round(took, 2),
        "slow_reconnects": dropped[0],
    }


def large_bodies(
    server: Server, n: int = 8, size: int = 16 * MiB, timeout: float = 60.0
) -> dict[str, Any]:
    """``n`` concurrent requests with a ``size``-byte JSON body: statuses and the server's RSS
    before, at its peak (sampled every 5 ms) and after (once the requests are answered)."""
    body = large_body(size)
    base = server.rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.005)

    results: list[tuple[int, dict[str, str]]] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def client() -> None:
        start.wait()
        r = request(server.port, body, timeout=timeout)
        with lock:
            results.append(r)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client) for _ in range(n)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(2 * timeout)
    done.set()
    sampler.join(5)
    time.sleep(0.3)
    statuses = [s for s, _ in results]
    return {
        "bodies": n,
        "body_mb": round(len(body) / MiB, 2),
        "ok": statuses.count(200),
        "refused_503": statuses.count(503),
        "retry_after": sorted({h.get("retry-after", "") for s, h in results if s == 503}),
        "statuses": sorted(statuses),
        "errors": sorted({h["error"] for s, h in results if s == 0}),
        "rss_before_mb": round(base, 1),
        "rss_peak_mb": round(peak[0], 1),
        "rss_after_mb": round(server.rss_mb(), 1),
    }


if __name__ == "__main__":
    _serve(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
