"""Feedback capture end to end: a real agent serving over HTTP, every topic watched on mosquitto.

Raw inputs never leave the device unless capture is on: with it off, no message on any topic
holds the distinctive input values (base64 fields decoded too); with it on (by the config, or
by a signed deployment), samples arrive on devices/ID/samples as documented.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.agent_helpers import Broker, Listener, deploy, free_port, publish, set_deployment
from tests.integration.test_serve import _request, _serve_cfg, _wait_ready

pytestmark = pytest.mark.integration

# Distinctive inputs: exact float32 values no model, artifact or message holds by chance.
X = (1000.0 + np.arange(64, dtype=np.float32) * 0.125).reshape(1, 64).astype(np.float32)
MARK_BYTES = X[0, :4].astype("<f4").tobytes()
MARK_TEXT = b"1000.125"


@pytest.fixture
def everything(broker: Broker) -> Iterator[Listener]:
    lis = Listener(broker.url, patterns=("#",))
    try:
        yield lis
    finally:
        lis.close()


def _strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def _leaks(payload: bytes) -> bool:
    """The distinctive inputs are in ``payload``: as bytes, as text, or base64 in a JSON string."""
    if MARK_BYTES in payload or MARK_TEXT in payload:
        return True
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    for s in _strings(doc):
        if len(s) >= 16:
            try:
                if MARK_BYTES in base64.b64decode(s, validate=True):
                    return True
            except (binascii.Error, ValueError):
                pass
    return False


def _body(x: np.ndarray, rid: str, label: Any = None) -> bytes:
    doc: dict[str, Any] = {
        "id": rid,
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
    }
    if label is not None:
        doc["parameters"] = {"label": label}
    return json.dumps(doc).encode()


def _infer(port: int, rid: str, label: Any = None) -> None:
    status, doc = _request(port, "POST", "/v2/models/tiny/infer", _body(X, rid, label))
    assert status == 200, doc


def _messages(lis: Listener) -> list[tuple[str, bytes]]:
    with lis._cv:
        return list(lis.messages)


def _samples(lis: Listener, device: str) -> list[dict[str, Any]]:
    topic = f"edgefleet/v1/devices/{device}/samples"
    return [json.loads(p) for t, p in _messages(lis) if t == topic]


def _telemetry(lis: Listener, device: str) -> list[dict[str, Any]]:
    topic = f"edgefleet/v1/devices/{device}/telemetry"
    return [json.loads(p) for t, p in _messages(lis) if t == topic]


def _wait(cond: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _start(agents: Any, broker: Broker, artifacts: Any, device: str, **kw: Any) -> tuple[int, str]:
    port = free_port()
    sha = publish(broker.url, artifacts(version="1.0.0", reference=True))
    agents.start(device, serve=_serve_cfg(port), telemetry={"interval_s": 0.3}, **kw)
    return port, sha


def test_capture_off_nothing_raw_leaves(
    broker: Broker, listener: Listener, everything: Listener, agents: Any, artifacts: Any
) -> None:
    port, sha = _start(agents, broker, artifacts, "off")
    deploy(broker.url, "tiny@1.0.0", device="off")
    listener.wait_state("off", "HEALTHY", sha, timeout=30)
    _wait_ready(port)
    for i in range(30):
        _infer(port, f"r{i}", label=1 if i % 2 else None)
    status, _ = _request(
        port, "POST", "/v2/models/tiny/feedback", json.dumps({"id": "r0", "label": 2}).encode()
    )
    assert status == 404  # nothing kept while capture is off
    n = len(_telemetry(everything, "off"))
    _wait(lambda: len(_telemetry(everything, "off")) >= n + 3, what="telemetry after traffic")
    msgs = _messages(everything)
    assert msgs and not [t for t, p in msgs if _leaks(p)]
    assert not _samples(everything, "off")
    assert not [d for d in _telemetry(everything, "off") if "capture" in d]
    assert not (agents.state_dir("off") / "samples").exists()
    counts = [d["latency"]["count"] for d in _telemetry(everything, "off")]
    assert sum(counts) >= 30  # the inferences were served (and seen by telemetry)


def test_capture_by_config_redacts_labels_and_caps(
    broker: Broker,
    listener: Listener,
    everything: Listener,
    agents: Any,
    artifacts: Any,
    tmp_path: Path,
) -> None:
    hook = tmp_path / "redact.py"
    hook.write_text(
        "import numpy as np\n"
        "def scrub(inputs, outputs):\n"
        "    return {k: np.full_like(v, 7.0) for k, v in inputs.items()}, outputs\n"
    )
    capture = {"enabled": True, "sample_rate": 1.0, "max_per_hour": 5, "redact": f"{hook}:scrub"}
    port, sha = _start(agents, broker, artifacts, "cap", capture=capture)
    deploy(broker.url, "tiny@1.0.0", device="cap")
    listener.wait_state("cap", "HEALTHY", sha, timeout=30)
    _wait_ready(port)
    _infer(port, "labelled", label=[0, 1])
    for i in range(19):
        _infer(port, f"r{i}")
    _wait(lambda: len(_samples(everything, "cap")) >= 5, what="5 samples")
    _wait(
        lambda: (
            sum(d.get("capture", {}).get("dropped", 0) for d in _telemetry(everything, "cap")) >= 15
        ),
        what="the drops in telemetry",
    )
    # Every one of the 20 was handled (5 queued, 15 dropped and counted): no sixth can come.
    samples = _samples(everything, "cap")
    assert len(samples) == 5  # max_per_hour holds
    first = samples[0]
    assert first["trigger"] == "label" and first["label"] == [0, 1]
    assert first["request_id"] == "labelled"
    assert [d["seq"] for d in samples] == [1, 2, 3, 4, 5]
    for d in samples:
        assert d["device"] == "cap" and d["model"] == {
            "name": "tiny",
            "version": "1.0.0",
            "sha256": sha,
        }
        assert d["redacted"] is True
        x = d["inputs"]["x"]
        assert x["dtype"] == "float32" and x["shape"] == [1, 64]
        got = np.frombuffer(base64.b64decode(x["data"]), "<f4")
        assert (got == 7.0).all()  # the hook ran before anything was queued
        assert set(d["outputs"]) == {"y"}
    assert not [t for t, p in _messages(everything) if _leaks(p)]
    blocks = [d["capture"] for d in _telemetry(everything, "cap") if "capture" in d]
    assert sum(b["captured"] for b in blocks) == 5 and all(
        b["redaction_errors"] == 0 for b in blocks
    )


def test_capture_by_signed_deployment_and_outputs_only(
    broker: Broker, listener: Listener, everything: Listener, agents: Any, artifacts: Any
) -> None:
    port, sha = _start(agents, broker, artifacts, "dep")
    set_deployment(broker.url, "dep", "tiny", "1.0.0", sha, capture={"sample_rate": 1.0})
    listener.wait_state("dep", "HEALTHY", sha, timeout=30)
    _wait_ready(port)
    for i in range(3):
        _infer(port, f"r{i}")
    _wait(lambda: len(_samples(everything, "dep")) >= 3, what="samples from the deployment")
    d = _samples(everything, "dep")[0]
    assert d["trigger"] == "sample" and d["redacted"] is False
    got = np.frombuffer(base64.b64decode(d["inputs"]["x"]["data"]), "<f4").reshape(1, 64)
    assert np.array_equal(got, X)  # capture on: the raw inputs, as sent

    # The same artifact deployed again with outputs_only: inputs stay on the device.
    set_deployment(
        broker.url, "dep", "tiny", "1.0.0", sha, capture={"sample_rate": 1.0, "outputs_only": True}
    )
    n = len(_samples(everything, "dep"))

    def outputs_only_arrived() -> bool:
        _infer(port, "later")
        return any("inputs" not in s for s in _samples(everything, "dep")[n:])

    _wait(outputs_only_arrived, what="an outputs-only sample")
    last = _samples(everything, "dep")[-1]
    assert "inputs" not in last and last["outputs"]["y"]["shape"][0] == 1

    # Capture off again: a deployment without capture keys, nothing more arrives.
    set_deployment(broker.url, "dep", "tiny", "1.0.0", sha)

    def off() -> bool:  # a telemetry window that served inferences and captured none
        _infer(port, "probe")
        served = [d for d in _telemetry(everything, "dep") if d["latency"]["count"]]
        last = served[-1]["capture"] if served else {}
        return last.get("captured") == 0 and last.get("queue_bytes") == 0  # and all delivered

    _wait(off, what="capture off after the new deployment")
    n = len(_samples(everything, "dep"))
    for i in range(5):
        _infer(port, f"off{i}")
    m = len(_telemetry(everything, "dep"))
    _wait(lambda: len(_telemetry(everything, "dep")) >= m + 3, what="telemetry")
    assert len(_samples(everything, "dep")) == n
