"""The canary gate for text-generation models: decode tokens/s and TTFT from telemetry's
generation blocks, the canary's against the replaced model's on the same device."""

from __future__ import annotations

import pytest

from agent.protocol import topics
from agent.protocol.messages import (
    ActiveModel,
    GenerationWindow,
    LatencyWindow,
    Telemetry,
    encode,
)
from fleet.rollout.policy import Gate
from tests.unit.fleet.test_rollout import NEW, OLD, event, rollout


def gen_telemetry(
    dev: str, active: str, tok_s: float, ttft: float, errors: int = 0
) -> tuple[str, bytes]:
    tm = Telemetry(
        device=dev,
        seq=1,
        ts=0.0,
        interval_s=1,
        uptime_s=1,
        active=ActiveModel(name="m", version="1", sha256=active),
        latency=LatencyWindow(count=0, throughput_per_s=0),  # no /infer traffic
        generation=GenerationWindow(
            requests=2, tokens=60, tok_s=tok_s, ttft_p50_ms=ttft, ttft_p95_ms=ttft, errors=errors
        ),
    )
    return topics.device_topic(dev, "telemetry"), encode(tm)


@pytest.mark.parametrize(
    ("tok_s", "ttft", "verdict", "why"),
    [
        (29.0, 105.0, "ok", ""),  # within 20% and 20% + 5 ms
        (23.0, 100.0, "fail", "decode 23.0 tokens/s vs 30.0 before (-23%; allowed -20%)"),
        (30.0, 130.0, "fail", "TTFT p95 130.0 ms vs 100.0 ms before"),
    ],
)
def test_text_generation_canary_gate(tok_s: float, ttft: float, verdict: str, why: str) -> None:
    ro = rollout(gate=Gate(observe_s=0))
    assert ro.feed(*gen_telemetry("d0", OLD, tok_s=30.0, ttft=100.0), now=0)
    ro.feed(*event("d0", "ACTIVE"), now=1)
    ro.feed(*gen_telemetry("d0", NEW, tok_s=tok_s, ttft=ttft), now=2)
    got, reason = ro.canary_verdict(2)
    assert got == verdict and why in reason
    if verdict == "fail":
        assert ro.needs_rollback("d0")


def test_generation_errors_fail_the_canary() -> None:
    ro = rollout(gate=Gate(observe_s=0))
    ro.feed(*event("d0", "ACTIVE"), now=0)
    ro.feed(*gen_telemetry("d0", NEW, tok_s=30.0, ttft=90.0, errors=2), now=1)
    assert ro.canary_verdict(1) == ("fail", "d0: 2 inference errors reported in telemetry")
