"""The local inference endpoint on a real agent process: v2 REST with tritonclient and curl,
every bad request answered with a 4xx and error JSON, and no failed request across a model swap."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol.golden import GoldenSet
from tests.agent_helpers import Broker, Listener, deploy, free_port, publish

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024


def _serve_cfg(port: int, **kw: Any) -> dict[str, Any]:
    return {
        "port": port,
        "max_body_bytes": MAX_BODY,
        "request_timeout_s": 1.0,
        "max_connections": 16,
        **kw,
    }


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def _wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _request(port, "GET", "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("endpoint never became ready")


def _golden(state_dir: Path) -> GoldenSet:
    return GoldenSet.load(state_dir / "active" / "golden.npz")


def _infer_body(x: np.ndarray) -> bytes:
    return json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ],
        }
    ).encode()


def test_v2_protocol_clients_and_bad_requests(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    port = free_port()
    sha = publish(broker.url, artifacts(version="1.0.0"))
    agents.start("srv", serve=_serve_cfg(port))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the endpoint is up before any model is
        try:
            status, doc = _request(port, "GET", "/v2/health/live")
            break
        except OSError:
            time.sleep(0.1)
    assert (status, doc) == (200, {"live": True})
    assert _request(port, "GET", "/v2/health/ready") == (503, {"ready": False})
    status, doc = _request(
        port, "POST", "/v2/models/tiny/infer", _infer_body(np.zeros((1, 64), np.float32))
    )
    assert status == 503 and "no model" in doc["error"]

    deploy(broker.url, "tiny@1.0.0", device="srv")
    listener.wait_state("srv", "ACTIVE", sha, timeout=30)
    _wait_ready(port)
    golden = _golden(agents.state_dir("srv"))
    x, y = golden.inputs["x"], golden.expected["y"]

    # tritonclient, unchanged: metadata, readiness, binary and JSON tensors
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["versions"] == ["1.0.0"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    for binary in (True, False):
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = client.infer(
            "tiny", [inp], outputs=[th.InferRequestedOutput("y", binary_data=binary)]
        )
        np.testing.assert_allclose(res.as_numpy("y"), y, rtol=1e-5, atol=1e-5)
        assert res.get_response()["model_version"] == "1.0.0"
    res = client.infer("tiny", [inp], model_version="1.0.0")  # versions/{v}/infer, default outputs
    np.testing.assert_allclose(res.as_numpy("y"), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(th.InferenceServerException, match="not active"):
        client.infer("tiny", [inp], model_version="9.9.9")
    client.close()

    # curl, JSON tensors
    curl = shutil.which("curl")
    if curl is not None:
        out = subprocess.run(
            [
                curl,
                "-s",
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-d",
                _infer_body(x[:2]).decode(),
                f"http://127.0.0.1:{port}/v2/models/tiny/infer",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        body, code = out.rsplit("\n", 1)
        doc = json.loads(body)
        assert code == "200" and doc["id"] == "r1" and doc["outputs"][0]["shape"] == [2, 10]
        np.testing.assert_allclose(
            np.asarray(doc["outputs"][0]["data"]).reshape(2, 10), y[:2], rtol=1e-5, atol=1e-5
        )

    # every bad request: a 4xx with error JSON, never a 500
    good = json.loads(_infer_body(x[:1]))
    bad: list[tuple[str, str, bytes | None, dict[str, str], int]] = [
        ("POST", "/v2/models/other/infer", _infer_body(x[:1]), {}, 404),
        ("GET", "/v2/models/other", None, {}, 404),
        ("GET", "/v2/models/tiny/versions/2.0.0/ready", None, {}, 404),
        ("GET", "/v2/nothing", None, {}, 404),
        ("GET", "/v2/models/tiny/infer", None, {}, 405),
        ("POST", "/v2/models/tiny/infer", b"{not json", {}, 400),
        ("POST", "/v2/models/tiny/infer", b"[1, 2]", {}, 400),
        ("POST", "/v2/models/tiny/infer", b"[" * 100_00 + b"]" * 100_00, {}, 400),
        (
            "POST",
            "/v2/models/tiny/infer",
            json.dumps({**good, "inputs": [{**good["inputs"][0], "shape": [1, 63]}]}).encode(),
            {},
            400,
        ),
        (
            "POST",
            "/v2/models/tiny/infer",
            json.dumps({**good, "inputs": [{**good["inputs"][0], "datatype": "FP64"}]}).encode(),
            {},
            400,
        ),
        (
            "POST",
            "/v2/models/tiny/infer",
            json.dumps({**good, "inputs": [{**good["inputs"][0], "name": "z"}]}).encode(),
            {},
            400,
        ),
        (
            "POST",
            "/v2/models/tiny/infer",
            json.dumps({**good, "inputs": [{**good["inputs"][0], "data": ["a"] * 64}]}).encode(),
            {},
            400,
        ),
        (
            "POST",
            "/v2/models/tiny/infer",
            json.dumps({**good, "inputs": [{**good["inputs"][0], "data": [1.0] * 3}]}).encode(),
            {},
            400,
        ),
        (
            "POST",
            "/v2/models/tiny/infer",
            json.dumps({**good, "outputs": [{"name": "nope"}]}).encode(),
            {},
            400,
        ),
        ("POST", "/v2/models/tiny/infer", json.dumps({"inputs": []}).encode(), {}, 400),
        (
            "POST",
            "/v2/models/tiny/infer",
            _infer_body(x[:1]),
            {"Inference-Header-Content-Length": "999999"},
            400,
        ),
        ("POST", "/v2/models/tiny/infer", b"x" * (MAX_BODY + 1), {}, 413),
    ]
    for method, path, body, headers, want in bad:
        status, doc = _request(port, method, path, body, headers)
        assert status == want, (path, body[:80] if body else None, status, doc)
        assert isinstance(doc.get("error"), str) and doc["error"], doc

    # a body the server does not read is never parsed as the next request on the connection
    hidden = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (
        b"POST /v2/models/tiny/nope/infer",
        b"GET /v2/health/live",
        b"POST /v2/health/live",
    ):
        out = _raw_exchange(
            port,
            head + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden,
        )
        assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out, out
    # keep-alive still works for well-formed requests
    two = _raw_exchange(
        port,
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert two.count(b"HTTP/1.1 200 OK") == 2, two
    # no Content-Length, and a client that sends half a request and goes silent (slowloris)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0] + b" "
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        assert _request(port, "GET", "/v2/health/live")[0] == 200  # others are still served
        data = s.recv(4096)  # the server gives up on the silent client after request_timeout_s
        assert data == b"" or b" 408 " in data.split(b"\r\n")[0] + b" "
    assert time.monotonic() - t0 < 5
    # one header byte every 0.2 s: each read is quick, but the whole request has request_timeout_s
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        closed = False
        for _ in range(25):
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            s.settimeout(0.2)
            try:
                if s.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
    assert closed and time.monotonic() - t0 < 3, time.monotonic() - t0
    # over max_connections with idle connections: the oldest idle one is closed for the newcomer
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        time.sleep(0.2)
        status, doc = _request(port, "GET", "/v2/health/live")
        assert status == 200
        idle[0].settimeout(2)
        assert idle[0].recv(4096) == b""  # closed without an unasked-for response
    finally:
        for s in idle:
            s.close()
    time.sleep(1.5)  # the idle connections' threads time out
    assert _request(port, "GET", "/v2/health/live")[0] == 200
    agents.stop_all()
    assert agents.procs[0].proc.returncode == 0


def test_no_request_fails_across_a_model_swap(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any, tmp_path: Path
) -> None:
    port = free_port()
    sha1 = publish(broker.url, artifacts(version="1.0.0"))
    sha2 = publish(broker.url, artifacts(version="1.1.0", seed=1))
    # the swap, not the latency gate, is under test: 4 clients hammer the endpoint meanwhile
    agents.start("swap", serve=_serve_cfg(port, max_connections=64), p95_slack_ms=100.0)
    deploy(broker.url, "tiny@1.0.0", device="swap")
    listener.wait_state("swap", "HEALTHY", sha1, timeout=30)
    _wait_ready(port)
    x = _golden(agents.state_dir("swap")).inputs["x"][:4]
    results: list[tuple[str, np.ndarray]] = []
    failures: list[str] = []
    stop = threading.Event()
    body = _infer_body(x)

    def client() -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        end = time.monotonic() + 60  # bounded whatever happens
        while not stop.is_set() and time.monotonic() < end:
            try:
                c.request("POST", "/v2/models/tiny/infer", body=body)
                r = c.getresponse()
                doc = json.loads(r.read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            if r.status != 200:
                failures.append(f"{r.status} {doc}")
                continue
            results.append(
                (
                    doc["model_version"],
                    np.asarray(doc["outputs"][0]["data"], np.float32).reshape(4, 10),
                )
            )
        c.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        deploy(broker.url, "tiny@1.1.0", device="swap")
        listener.wait_state("swap", "ACTIVE", sha2, timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(v == "1.1.0" for v, _ in results[-50:]) < 20:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    versions = [v for v, _ in results]
    assert versions.count("1.0.0") > 10 and versions.count("1.1.0") > 10, (
        versions.count("1.0.0"),
        versions.count("1.1.0"),
    )
    # each answer came from the model it names (a request finishes on the model it started with)
    expected = {}
    for d in (agents.state_dir("swap") / "versions").iterdir():
        if not d.name.startswith("."):
            with _ort(d / "model.onnx") as sess:
                expected[d.name.split("-")[0]] = sess.infer({"x": x})["y"]
    for v, out in results:
        np.testing.assert_allclose(out, expected[v], rtol=1e-4, atol=1e-4)


def _ort(path: Path) -> Any:
    from agent.runtime import load_session

    return load_session("onnxruntime", path)


def _raw_exchange(port: int, requests: bytes) -> bytes:
    """Send raw bytes on one connection; read until the server closes it (bounded)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(requests)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    return out
