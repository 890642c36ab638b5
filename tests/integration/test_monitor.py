"""Drift monitoring end to end: a real agent serving over HTTP, telemetry and events on mosquitto."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.agent_helpers import Broker, Listener, deploy, free_port, publish
from tests.integration.test_serve import _infer_body, _request, _serve_cfg, _wait_ready

pytestmark = pytest.mark.integration


def _monitor_blocks(listener: Listener, device: str) -> list[dict[str, Any]]:
    with listener._cv:
        msgs = list(listener.messages)
    topic = f"edgefleet/v1/devices/{device}/telemetry"
    docs = [json.loads(p) for t, p in msgs if t == topic]
    return [d["monitor"] for d in docs if "monitor" in d]


def test_monitor_block_and_one_drift_event(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    port = free_port()
    sha = publish(broker.url, artifacts(version="1.0.0", reference=True))
    agents.start(
        "mon",
        serve=_serve_cfg(port),
        telemetry={"interval_s": 0.5},
        monitor={"min_count": 20, "drift_windows": 2, "max_overhead": 1.0},
    )
    deploy(broker.url, "tiny@1.0.0", device="mon")
    listener.wait_state("mon", "HEALTHY", sha, timeout=30)
    _wait_ready(port)

    scale = [1.0]
    stop = threading.Event()
    rng = np.random.default_rng(7)

    def traffic() -> None:
        while not stop.is_set():
            x = (rng.standard_normal((16, 64)) * scale[0]).astype(np.float32)
            status, _ = _request(port, "POST", "/v2/models/tiny/infer", _infer_body(x))
            assert status == 200

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while len([b for b in _monitor_blocks(listener, "mon") if b["count"] >= 20]) < 4:
            assert time.monotonic() < deadline, "no monitor blocks in telemetry"
            time.sleep(0.1)
        blocks = [b for b in _monitor_blocks(listener, "mon") if b["count"] >= 20]
        for b in blocks:
            assert b["metric"] == "psi" and not b["drifting"] and b["drift"]["max"] < 0.25
            assert set(b["drift"]) == {"inputs", "outputs", "classes", "max"}
            assert set(b["drift"]["inputs"]) == {"x"} and set(b["drift"]["outputs"]) == {"y"}
            assert sum(b["classes"].values()) == b["count"]
            assert 0 < b["mean_confidence"] <= 1 and b["non_finite"] == 0
        assert not [e for e in listener.events("mon") if e["kind"] == "drift"]

        scale[0] = 3.0  # a clear shift of every input
        ev = listener.wait_event("mon", lambda e: e["kind"] == "drift", timeout=30)
        assert ev["reason"].startswith("drift: ") and "> 0.25 (2 windows)" in ev["reason"]
        assert ev["name"] == "tiny" and ev["sha256"] == sha
        assert ev["detail"]["threshold"] == 0.25 and ev["detail"]["windows"] == 2
        assert ev["detail"]["scores"]["inputs"]["x"] > 0.25
        n = len(_monitor_blocks(listener, "mon"))
        deadline = time.monotonic() + 20
        while len(_monitor_blocks(listener, "mon")) < n + 3:  # the episode goes on: no new event
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _monitor_blocks(listener, "mon")[-1]["drifting"] is True
        assert len([e for e in listener.events("mon") if e["kind"] == "drift"]) == 1
    finally:
        stop.set()
        t.join(10)
