"""Commands cannot starve the agent ([commands]): a bounded queue answered "busy" beyond it, a
benchmark budget per minute and a cap per benchmark, and benchmark runs kept out of the serving
latency that telemetry reads. The worker runs on its own thread; the in-memory transport plays
the broker's thread that delivers commands."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import CommandsConfig, load_config
from agent.deploy.agent import Agent
from agent.deploy.commands import BenchBudget
from agent.deploy.policy import resolve_policy
from agent.protocol import topics
from agent.protocol.messages import encode
from agent.runtime import InferenceSession
from agent.telemetry.power import PowerReader
from agent.transport.fake import FakeTransport
from fleet.publish import announcement
from tests.agent_helpers import (
    TIME_SCALE,
    make_artifact,
    make_keys,
    sealed_command,
    sealed_for,
    write_config,
)
from tests.unit.agent.test_power import POWER_KEYS, rapl_tree

CHUNK = 1024
INFER_S = 0.002  # each benchmark run of the slowed model


class _Slow:
    """The real session, slowed down so a benchmark takes measurable time."""

    def __init__(self, inner: InferenceSession) -> None:
        self.inner = inner

    def infer(self, feeds: Any) -> Any:
        time.sleep(INFER_S)
        return self.inner.infer(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _agent(tmp: Path, **commands: Any) -> tuple[Agent, FakeTransport]:
    keys = make_keys(tmp / "keys")
    cfg_path = write_config(
        tmp / "agent.toml",
        "dev",
        "mqtt://127.0.0.1:1",
        [keys.public],
        tmp / "state",
        probation_s=0.0,
        commands=commands,
    )
    fake = FakeTransport()
    agent = Agent(load_config(cfg_path), resolve_policy(load_config(cfg_path)), fake)
    agent.start()
    art = make_artifact(tmp, keys, version="1.0.0")
    ann = announcement(art, CHUNK)
    data = art.read_bytes()
    for i in range(len(ann.chunks)):
        fake.retained[topics.artifact_chunk(ann.sha256, i)] = data[i * CHUNK : (i + 1) * CHUNK]
    fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(
            fake.retained[topics.artifact_manifest(ann.sha256)], "tiny", "1.0.0", device="dev"
        ),
        retain=True,
    )
    agent.drain()
    agent.step(0)
    assert agent.session is not None
    agent.installer.session = _Slow(agent.session)  # type: ignore[assignment]
    agent.latency.window()  # start counting served inferences from here
    return agent, fake


@pytest.fixture
def worker() -> Iterator[Callable[[Agent], None]]:
    """``worker(agent)`` runs the agent's worker loop on a thread (as ``Agent.run`` does)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(agent: Agent) -> None:
        def loop() -> None:
            while not stop.is_set():
                agent.step(0.02)

        threads.append(threading.Thread(target=loop, daemon=True))
        threads[-1].start()

    try:
        yield start
    finally:
        stop.set()
        for th in threads:
            th.join(10)


def _results(fake: FakeTransport) -> dict[str, dict[str, Any]]:
    with fake._lock:
        pubs = list(fake.published)
    out: dict[str, dict[str, Any]] = {}
    for t, p, _ in pubs:
        if t.endswith("/cmd/result"):
            doc = json.loads(p)
            assert doc["id"] not in out, f"{doc['id']} answered twice"
            out[doc["id"]] = doc
    return out


def _send(fake: FakeTransport, cid: str, op: str, **args: Any) -> None:
    fake.inject(
        topics.device_topic("dev", "cmd"), sealed_command("dev", {"id": cid, "op": op, **args})
    )


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout * TIME_SCALE
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def test_status_is_answered_promptly_under_a_benchmark_flood(
    tmp_path: Path, worker: Callable[[Agent], None]
) -> None:
    budget, cap = 1.0, 0.5
    agent, fake = _agent(
        tmp_path, max_pending=8, bench_budget_s=budget, bench_max_s=cap, bench_max_runs=1000
    )
    worker(agent)
    t0 = time.monotonic()
    for i in range(60):  # 60 x 1000 runs of 2 ms: two minutes of work without the limits
        _send(fake, f"b{i}", "benchmark", runs=1000)
    # A status in the middle of the flood finds the queue full: it is answered "busy" at once
    # (at the benchmark's next run), not after the benchmarks.
    _send(fake, "st0", "status")
    assert _wait(lambda: "st0" in _results(fake), 1.0), "busy answer not prompt"
    assert _results(fake)["st0"]["reason"] == "busy: 8 commands pending"
    # Asked again (as an operator would), it is answered ok once the queue drains, which the
    # budget bounds: the worker owes at most the budget plus one benchmark's overshoot.
    n = 0
    while True:
        n += 1
        _send(fake, f"st{n}", "status")
        assert _wait(lambda n=n: f"st{n}" in _results(fake), 1.0)
        if _results(fake)[f"st{n}"]["ok"]:
            break
        assert time.monotonic() - t0 < (budget + cap + 2) * TIME_SCALE, "status starved"
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert took < (budget + cap + 2) * TIME_SCALE, took
    assert _wait(lambda: len(_results(fake)) == 61 + n, 5 + budget + cap)
    res = _results(fake)
    bench = [r for r in res.values() if r["id"].startswith("b")]
    busy = [r for r in bench if r["reason"].startswith("busy: ")]
    spent = [r for r in bench if r["reason"].startswith("benchmark budget spent")]
    ran = [r for r in bench if r["ok"]]
    assert len(busy) >= 60 - 8 - 1 and busy[0]["reason"] == "busy: 8 commands pending"
    assert ran and len(ran) <= 3 and all(r["detail"]["runs"] < 1000 for r in ran)
    assert spent and spent[0]["detail"]["retry_after_s"] >= 1
    assert "try again in" in spent[0]["reason"]
    assert len(busy) + len(spent) + len(ran) == 60  # every command answered, none dropped
    # benchmark runs are not served traffic: the latency window telemetry reads saw none
    assert agent.latency.window().count == 0
    st = res[f"st{n}"]["detail"]
    assert st["benchmarks"]["seconds"] <= budget + cap
    assert st["benchmarks"]["runs"] == sum(r["detail"]["runs"] for r in ran)
    refused = sum(1 for r in res.values() if r["reason"].startswith("busy: "))
    assert agent.status()["commands"] == {"pending": 0, "refused_busy": refused}
    assert agent.dropped == 0


def test_benchmark_cap_budget_and_served_latency(tmp_path: Path) -> None:
    agent, fake = _agent(tmp_path, bench_budget_s=0.8, bench_max_s=0.3, bench_max_runs=500)
    _send(fake, "big", "benchmark", runs=501)
    _send(fake, "b1", "benchmark", runs=500)  # 500 x 2 ms: cut at 0.3 s
    agent.drain()
    res = _results(fake)
    assert res["big"]["reason"] == "runs must be between 1 and 500"
    assert res["b1"]["ok"] and 0 < res["b1"]["detail"]["runs"] < 500
    assert res["b1"]["detail"]["requested_runs"] == 500
    # one more fits (about 0.48 s left), the next does not; served inferences still count
    _send(fake, "b2", "benchmark", runs=500)
    _send(fake, "b3", "benchmark", runs=5)
    agent.drain()
    res = _results(fake)
    assert res["b2"]["ok"] and not res["b3"]["ok"]
    assert res["b3"]["detail"]["retry_after_s"] >= 1
    feeds = agent.golden.bench_feed() if agent.golden else {}
    agent.infer({k: np.asarray(v) for k, v in feeds.items()})
    assert agent.latency.window().count == 1


def test_benchmarks_can_be_turned_off(tmp_path: Path) -> None:
    agent, fake = _agent(tmp_path, bench_budget_s=0)
    _send(fake, "b", "benchmark")
    agent.drain()
    assert "benchmarks are off" in _results(fake)["b"]["reason"]


def test_busy_answers_reach_ids_and_unreadable_ones_are_counted(tmp_path: Path) -> None:
    agent, fake = _agent(tmp_path, max_pending=2)
    for i in range(4):
        _send(fake, f"s{i}", "status")
    fake.inject(topics.device_topic("dev", "cmd"), b"\xff not json")
    assert agent.pending_commands == 2 and agent.dropped == 1
    agent.drain()
    res = _results(fake)
    assert res["s0"]["ok"] and res["s1"]["ok"]
    assert res["s2"]["reason"] == res["s3"]["reason"] == "busy: 2 commands pending"
    assert agent.pending_commands == 0


def test_bench_budget_refills_at_its_rate() -> None:
    now = [0.0]
    b = BenchBudget(CommandsConfig(bench_budget_s=6, bench_max_s=2), clock=lambda: now[0])
    assert b.wait_s() == 0
    b.spend(5.0)  # 1 s left: a benchmark needs 2
    assert b.wait_s() == pytest.approx(10.0)  # refills 0.1 s per second
    now[0] = 10.0
    assert b.wait_s() == 0 and b.left() == pytest.approx(2.0)
    now[0] = 1000.0
    assert b.left() == 6.0  # never beyond the budget
    with pytest.raises(ValueError, match="bench_budget_s"):
        CommandsConfig(bench_budget_s=1, bench_max_s=2)


def test_benchmark_reports_energy_per_inference(tmp_path: Path) -> None:
    agent, fake = _agent(tmp_path)
    _send(fake, "none", "benchmark", runs=5)
    agent.power = PowerReader(tmp_path / "no-sensors")
    agent.drain()
    assert not set(POWER_KEYS) & set(_results(fake)["none"]["detail"])

    root = rapl_tree(tmp_path / "sysfs", pkg0_uj=1_000_000)
    agent.power = PowerReader(root)
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    slow = agent.session

    class _Metered:
        """Each inference uses 2 mJ of package 0's counter."""

        def infer(self, feeds: Any) -> Any:
            counter.write_text(f"{int(counter.read_text()) + 2000}\n")
            return slow.infer(feeds)  # type: ignore[union-attr]

        def __getattr__(self, name: str) -> Any:
            return getattr(slow, name)

    agent.installer.session = _Metered()  # type: ignore[assignment]
    _send(fake, "b", "benchmark", runs=20)
    agent.drain()
    d = _results(fake)["b"]["detail"]
    assert d["runs"] == 20 and d["power_source"] == "rapl"
    # warm-up runs are in the energy and in the count alike
    assert d["energy_mj_per_inference"] == pytest.approx(2.0)
    # 2 mJ per inference of at least INFER_S: at most 1 W on average
    assert 0 < d["power_w"] <= 2e-3 / INFER_S
