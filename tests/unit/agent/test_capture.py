"""Feedback capture: triggers, caps, the queue's bounds, redaction, the message format; and the
monitor's differential privacy (Laplace noise)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.monitor.capture import RING_MAX, Capture, SamplePublisher, settings_for
from agent.monitor.monitor import Monitor
from agent.monitor.privacy import laplace
from agent.protocol import topics
from agent.protocol.messages import Deployment, Sample, Telemetry, decode
from agent.runtime import IOSpec
from agent.serve.holder import Loaded
from agent.telemetry.buffer import TelemetryBuffer
from agent.transport.fake import FakeTransport
from builder.reference import build_reference

SHA = "a" * 64


class _Session:
    inputs: ClassVar[list[IOSpec]] = [IOSpec("x", "float32", [1, 8])]
    outputs: ClassVar[list[IOSpec]] = [IOSpec("y", "float32", [1, 3])]

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _cfg(tmp: Path, **capture: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": "dev1",
            "profile": "test-cpu",
            "state_dir": str(tmp / "state"),
            "root_key": str(tmp / "root.pub"),
            "capture": capture,
        }
    )


def _loaded(monitor: Monitor | None = None) -> Loaded:
    return Loaded("tiny", "1.0.0", SHA, "onnxruntime", _Session(), monitor=monitor)  # type: ignore[arg-type]


def _monitor() -> Monitor:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    return Monitor(build_reference({"x": x}, {"y": x @ w}, "classification"))


def _samples(cap: Capture) -> list[dict[str, Any]]:
    assert cap.queue is not None
    return [json.loads(p) for _, p in cap.queue.after(0, 10_000)]


X = {"x": np.arange(8, dtype=np.float32).reshape(1, 8)}
Y = {"y": np.array([[0.1, 5.0, 0.2]], np.float32)}  # confident logits


def test_off_by_default_writes_nothing(tmp_path: Path) -> None:
    cap = Capture(_cfg(tmp_path), rand=lambda: 0.0)
    for _ in range(10):
        cap.offer(_loaded(_monitor()), X, Y, "r1", label=3)
    assert cap.queue is None and not (tmp_path / "state" / "samples").exists()
    assert cap.window() is None


def test_sample_format_and_seq(tmp_path: Path) -> None:
    cap = Capture(_cfg(tmp_path, enabled=True, sample_rate=1.0), rand=lambda: 0.5)
    cap.offer(_loaded(), X, Y, "req-1")
    cap.offer(_loaded(), X, Y)
    docs = _samples(cap)
    assert [d["seq"] for d in docs] == [1, 2]
    d = docs[0]
    assert set(d) == {
        "device", "seq", "ts", "model", "trigger", "request_id", "inputs", "outputs", "redacted"
    }  # fmt: skip
    assert d["model"] == {"name": "tiny", "version": "1.0.0", "sha256": SHA}
    assert d["trigger"] == "sample" and d["request_id"] == "req-1" and d["redacted"] is False
    x = d["inputs"]["x"]
    assert x["dtype"] == "float32" and x["shape"] == [1, 8]
    got = np.frombuffer(base64.b64decode(x["data"]), "<f4").reshape(x["shape"])
    assert np.array_equal(got, X["x"])
    assert "request_id" not in docs[1]
    decode(Sample, json.dumps(d).encode(), max_bytes=1 << 20)  # the strict model accepts it
    assert cap.window() == {
        "captured": 2,
        "dropped": 0,
        "redaction_errors": 0,
        "queue_bytes": any_int(),
    }


class any_int(int):
    def __new__(cls) -> any_int:
        return super().__new__(cls, 0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and other > 0

    __hash__ = int.__hash__


def test_triggers(tmp_path: Path) -> None:
    mon = _monitor()
    cap = Capture(_cfg(tmp_path, enabled=True, sample_rate=0.01), rand=lambda: 0.5)
    cap.offer(_loaded(mon), X, Y)  # confident, no drift, draw above the rate: nothing
    assert cap.queue is None or not _samples(cap)
    cap.offer(_loaded(mon), X, {"y": np.array([[1.0, 1.0, 1.0]], np.float32)})  # top-1 = 1/3
    cap.offer(_loaded(mon), X, Y, label=[0, 1])
    mon.episode.drifting = True
    cap.offer(_loaded(mon), X, Y)
    assert [d["trigger"] for d in _samples(cap)] == ["low_confidence", "label", "drift"]
    assert _samples(cap)[1]["label"] == [0, 1]
    cap2 = Capture(_cfg(tmp_path / "b", enabled=True, triggers=["sample"]), rand=lambda: 0.0)
    cap2.offer(_loaded(mon), X, {"y": np.array([[1.0, 1.0, 1.0]], np.float32)}, label=1)
    assert [d["trigger"] for d in _samples(cap2)] == ["sample"]
    assert _samples(cap2)[0]["label"] == 1  # a label goes with its sample whatever the trigger


def test_label_later_through_the_ring(tmp_path: Path) -> None:
    cap = Capture(_cfg(tmp_path, enabled=True, sample_rate=0.0), rand=lambda: 0.5)
    for i in range(RING_MAX + 10):
        cap.offer(_loaded(), X, Y, f"r{i}")
    assert cap.queue is None or not _samples(cap)  # kept in memory only
    assert not cap.feedback("r0", 1)  # beyond the last RING_MAX
    assert cap.feedback(f"r{RING_MAX + 9}", 2.5)
    assert not cap.feedback(f"r{RING_MAX + 9}", 2.5)  # once
    (d,) = _samples(cap)
    assert d["trigger"] == "label" and d["label"] == 2.5 and d["request_id"] == f"r{RING_MAX + 9}"


def test_caps_per_hour(tmp_path: Path) -> None:
    now = [1000.0]
    cap = Capture(
        _cfg(tmp_path, enabled=True, sample_rate=1.0, max_per_hour=3),
        rand=lambda: 0.0,
        clock=lambda: now[0],
    )
    for _ in range(5):
        cap.offer(_loaded(), X, Y)
    assert len(_samples(cap)) == 3
    assert cap.window()["dropped"] == 2  # type: ignore[index]
    now[0] += 3601
    cap.offer(_loaded(), X, Y)
    assert len(_samples(cap)) == 4
    small = Capture(
        _cfg(tmp_path / "b", enabled=True, sample_rate=1.0, max_bytes_per_hour=1000),
        rand=lambda: 0.0,
    )
    for _ in range(5):
        small.offer(_loaded(), X, Y)
    assert 1 <= len(_samples(small)) < 5  # one sample is a few hundred bytes


def test_queue_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path, 1_000_000, max_bytes=5000, name="samples.sqlite")
    for i in range(20):
        buf.append(bytes([i]) * 1000)
    assert buf.pending_bytes() <= 5000 and buf.pending() == 5
    assert [p[0] for _, p in buf.after(0, 100)] == [15, 16, 17, 18, 19]
    assert buf.reserve().dropped == 15


def test_outputs_only_and_redaction(tmp_path: Path) -> None:
    hook = tmp_path / "redact.py"
    hook.write_text(
        "calls = []\n"
        "def keep(inputs, outputs):\n"
        "    return {'x': inputs['x'] * 0}, outputs\n"
        "def drop(inputs, outputs):\n"
        "    return None\n"
        "def boom(inputs, outputs):\n"
        "    raise ValueError('no')\n"
    )
    cap = Capture(
        _cfg(tmp_path, enabled=True, sample_rate=1.0, outputs_only=True), rand=lambda: 0.0
    )
    cap.offer(_loaded(), X, Y)
    (d,) = _samples(cap)
    assert "inputs" not in d and set(d["outputs"]) == {"y"}
    for fn, n, errors in (("keep", 1, 0), ("drop", 0, 0), ("boom", 0, 1), ("nope", 0, 1)):
        c = Capture(
            _cfg(tmp_path / fn, enabled=True, sample_rate=1.0, redact=f"{hook}:{fn}"),
            rand=lambda: 0.0,
        )
        c.offer(_loaded(), X, Y)
        got = _samples(c)
        assert len(got) == n, fn
        w = c.window()
        assert w is not None and w["redaction_errors"] == errors, fn
        if n:
            assert got[0]["redacted"] is True
            assert not np.frombuffer(base64.b64decode(got[0]["inputs"]["x"]["data"]), "<f4").any()


def test_deployment_keys_override_the_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert settings_for(cfg.capture, None).enabled is False
    on = settings_for(cfg.capture, {"sample_rate": 1.0})
    assert on.enabled and on.sample_rate == 1.0 and on.max_per_hour == 100
    assert not settings_for(cfg.capture, {"sample_rate": 2.0}).enabled  # invalid: the config's
    assert not settings_for(cfg.capture, {"enabled": False, "sample_rate": 1.0}).enabled
    red = _cfg(tmp_path, redact="r.py:f").capture
    assert settings_for(red, {"redact": None}).redact == "r.py:f"  # cannot remove the hook
    cap = Capture(cfg, rand=lambda: 0.0)
    dep = {"name": "tiny", "version": "1.0.0", "sha256": SHA, "size": 1, "chunks_sha256": SHA}
    cap.deployment(Deployment.model_validate({**dep, "capture": {"sample_rate": 1.0}}))
    cap.offer(_loaded(), X, Y)
    other = Loaded("tiny", "0.9.0", "b" * 64, "onnxruntime", _Session())  # type: ignore[arg-type]
    cap.offer(other, X, Y)  # another version: the config's settings (off)
    assert [d["model"]["version"] for d in _samples(cap)] == ["1.0.0"]
    assert Deployment.model_validate(dep).capture is None  # old deployments still validate


def test_publisher_sends_qos1_and_deletes_on_ack(tmp_path: Path) -> None:
    fake = FakeTransport()
    fake.start(lambda *a: None, lambda: None)
    cap = Capture(_cfg(tmp_path, enabled=True, sample_rate=1.0), rand=lambda: 0.0)
    pub = SamplePublisher(cap, fake)
    pub.start()
    try:
        cap.offer(_loaded(), X, Y)
        topic = topics.device_topic("dev1", "samples")
        deadline = time.monotonic() + 10
        while not [m for m in fake.published if m[0] == topic]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while cap.queue is not None and cap.queue.pending():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        pub.stop()
    assert topics.parse(topic) == topics.Topic("samples", device="dev1")


def test_telemetry_capture_block_is_optional() -> None:
    base = {
        "device": "d",
        "seq": 1,
        "ts": 1.0,
        "interval_s": 1,
        "uptime_s": 1,
        "latency": {"count": 0, "throughput_per_s": 0},
    }
    assert Telemetry.model_validate(base).capture is None
    block = {"captured": 1, "dropped": 0, "redaction_errors": 0, "queue_bytes": 10}
    assert Telemetry.model_validate({**base, "capture": block}).capture == block


# -- differential privacy of the monitor's window ---------------------------------------------------
def test_laplace_off_by_default_unbiased_and_clipped() -> None:
    rng = np.random.default_rng(1)
    c = np.array([1000.0, 0.0])
    assert np.array_equal(laplace(c, None, rng), c)
    draws = np.stack([laplace(c, 0.5, rng) for _ in range(20_000)])
    assert abs(draws[:, 0].mean() - 1000.0) < 0.1  # scale 2: std of the mean ~0.02
    assert draws.min() >= 0.0 and (draws[:, 1] == 0).mean() > 0.4  # clipped at 0


def test_monitor_window_noised_only_with_epsilon() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    ref = build_reference({"x": x}, {"y": x @ w}, "classification")
    exact, noisy = Monitor(ref), Monitor(ref, dp_epsilon=0.1, rng=np.random.default_rng(2))
    for m in (exact, noisy):
        m.observe({"x": x[:500]}, {"y": x[:500] @ w})
    a, b = exact.window(), noisy.window()
    assert a is not None and b is not None
    assert a["count"] == 500 and "dp_epsilon" not in a
    assert b["dp_epsilon"] == 0.1
    assert b["count"] != 500 or b["classes"] != a["classes"]
    assert all(v >= 0 for v in b["classes"].values())


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_dp_epsilon_must_be_positive(tmp_path: Path, eps: float) -> None:
    with pytest.raises(ValueError):
        AgentConfig.model_validate(
            {
                "device_id": "d",
                "profile": "p",
                "state_dir": str(tmp_path),
                "root_key": str(tmp_path / "k"),
                "monitor": {"dp_epsilon": eps},
            }
        )
