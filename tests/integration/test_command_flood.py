"""A flood of benchmark commands through mosquitto against a real agent process: every command is
answered (busy, budget spent, or run), a status gets through within a bounded time, and telemetry
counts none of the benchmarks' inferences."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from agent.protocol import topics
from tests.agent_helpers import TIME_SCALE, Broker, Listener, deploy, publish, sealed_command

pytestmark = pytest.mark.integration


def test_benchmark_flood_does_not_starve_status(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    from fleet.mqtt import SyncClient, broker_config

    budget, cap = 1.0, 0.5
    sha = publish(broker.url, artifacts(version="1.0.0"))
    agents.start(
        "dev1",
        telemetry={"interval_s": 0.2},
        commands={"max_pending": 8, "bench_budget_s": budget, "bench_max_s": cap},
    )
    deploy(broker.url, "tiny@1.0.0", device="dev1")
    listener.wait_state("dev1", "HEALTHY", sha)
    cmd, res_topic = topics.device_topic("dev1", "cmd"), topics.device_topic("dev1", "cmd/result")
    t_topic = topics.device_topic("dev1", "telemetry")

    def results() -> dict[str, dict[str, object]]:
        with listener._cv:
            return {
                d["id"]: d for d in (json.loads(p) for t, p in listener.messages if t == res_topic)
            }

    with SyncClient(broker_config(broker.url)) as c:
        t0 = time.monotonic()
        for i in range(60):
            c.publish(cmd, sealed_command("dev1", {"id": f"b{i}", "op": "benchmark", "runs": 1000}))
        c.flush()
        n, ok_after = 0, None
        while ok_after is None:
            n += 1
            c.publish(cmd, sealed_command("dev1", {"id": f"st{n}", "op": "status"}))
            c.flush()
            got = listener.wait_message(res_topic, lambda d, n=n: d["id"] == f"st{n}", timeout=5)
            if got["ok"]:
                ok_after = time.monotonic() - t0
            else:
                assert str(got["reason"]).startswith("busy: ")
                assert time.monotonic() - t0 < (budget + cap + 5) * TIME_SCALE, "status starved"
                time.sleep(0.1)
    assert ok_after < (budget + cap + 5) * TIME_SCALE
    deadline = time.monotonic() + 15 * TIME_SCALE
    while sum(1 for k in results() if k.startswith("b")) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    bench = [r for k, r in results().items() if k.startswith("b")]
    assert len(bench) == 60  # none dropped without an answer
    reasons = [str(r["reason"]) for r in bench if not r["ok"]]
    assert all(r.startswith(("busy: ", "benchmark budget spent")) for r in reasons)
    assert any(r.startswith("busy: ") for r in reasons)
    assert sum(1 for r in bench if r["ok"]) >= 1
    # several telemetry windows since the flood: not one benchmark run is counted as served
    with listener._cv:
        before = sum(1 for t, _ in listener.messages if t == t_topic)
    deadline = time.monotonic() + 10 * TIME_SCALE
    while time.monotonic() < deadline:
        with listener._cv:
            msgs = [json.loads(p) for t, p in listener.messages if t == t_topic]
        if len(msgs) >= before + 3:
            break
        time.sleep(0.1)
    assert len(msgs) >= before + 3
    assert sum(m["latency"]["count"] for m in msgs) == 0
