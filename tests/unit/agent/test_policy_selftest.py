"""Budgets from the device profile, runtime/profile/version policy, and the p95 regression check."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.config import load_config
from agent.deploy import selftest
from agent.deploy.policy import resolve_policy
from agent.errors import ConfigError, IntegrityError
from agent.protocol.artifact import verify_artifact
from agent.protocol.signing import load_public_key
from agent.runtime.base import InferenceSession, IOSpec
from agent.store.versions import VersionStore
from tests.agent_helpers import TIME_SCALE, make_artifact, make_keys, write_config

PROFILE = """
name = "generic-cpu"
[hardware]
arch = "x86_64"
cores = 2
ram_mb = 2048
[runtime]
name = "onnxruntime"
threads = 1
[build]
candidates = ["fp32"]
[budgets]
max_artifact_kb = 2048
max_accuracy_drop_pt = 1.0
max_p95_ms = 12.5
max_ram_mb = 512
max_p95_regression_pct = 35.0
"""


def test_budgets_come_from_the_profile(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "generic-cpu.toml").write_text(PROFILE)
    path = write_config(
        tmp_path / "a.toml",
        "d",
        "mqtt://h:1",
        [keys.public],
        tmp_path / "s",
        profile="generic-cpu",
        max_p95_ms=None,
        max_p95_regression_pct=None,
    )
    text = (
        path.read_text()
        .replace("max_p95_ms = null\n", "")
        .replace("max_p95_regression_pct = null\n", "")
    )
    path.write_text(
        text.replace('runtimes = ["onnxruntime"]', f'runtimes = []\nprofiles_dir = "{profiles}"')
    )
    policy = resolve_policy(load_config(path))
    assert policy.max_p95_ms == 12.5 and policy.max_regression_pct == 35.0
    assert policy.runtimes == ("onnxruntime",)
    path.write_text(
        path.read_text().replace(f'profiles_dir = "{profiles}"', f'profiles_dir = "{tmp_path}"')
    )
    with pytest.raises(ConfigError, match="unknown profile 'generic-cpu'"):
        resolve_policy(load_config(path))


def test_policy_rejects_runtime_profile_and_downgrade(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    cfg = load_config(
        write_config(tmp_path / "a.toml", "d", "mqtt://h:1", [keys.public], tmp_path / "s")
    )
    policy = resolve_policy(cfg)
    pub = [load_public_key(keys.public)]
    vs = VersionStore(tmp_path / "s", keep=1)
    active = vs.unpack(verify_artifact(make_artifact(tmp_path, keys, version="2.0.0"), pub))
    policy.lines.record(active.manifest)  # what activating it does
    for kw, msg in (
        ({"runtime": "litert"}, "needs runtime 'litert'"),
        ({"profile": "other"}, "profile 'other'"),
        ({"version": "1.9.9"}, "older than 2.0.0, activated on this device before"),
    ):
        m = verify_artifact(make_artifact(tmp_path, keys, **kw), pub).manifest  # type: ignore[arg-type]
        with pytest.raises(IntegrityError, match=msg):
            policy.check(m)
    policy.check(verify_artifact(make_artifact(tmp_path, keys, version="2.0.1"), pub).manifest)
    # the line's highest version is persisted: a new policy (a restart) still refuses 1.9.9
    again = resolve_policy(cfg)
    m = verify_artifact(make_artifact(tmp_path, keys, version="1.9.9"), pub).manifest
    with pytest.raises(IntegrityError, match="anti-rollback"):
        again.check(m)


class Slow(InferenceSession):
    """Wraps a session and adds a fixed delay per call."""

    def __init__(self, inner: InferenceSession, delay_s: float) -> None:
        self.inner, self.delay = inner, delay_s

    @property
    def inputs(self) -> list[IOSpec]:
        return self.inner.inputs

    @property
    def outputs(self) -> list[IOSpec]:
        return self.inner.outputs

    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        time.sleep(self.delay)
        return self.inner.infer(feeds)


def test_p95_regression_against_current_model(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    vs = VersionStore(tmp_path / "s", keep=1)
    inst = vs.unpack(verify_artifact(make_artifact(tmp_path, keys), [load_public_key(keys.public)]))
    fast = selftest.load(inst, 1)
    golden = selftest.golden_of(inst)
    slow = Slow(selftest.load(inst, 1), 0.01)
    ok = selftest.check_candidate(fast, inst, 10, 1000.0, 20.0, 0.5, (slow, golden))
    assert ok.ok, ok.reason
    bad = selftest.check_candidate(slow, inst, 10, 1000.0, 20.0, 0.5, (fast, golden))
    assert not bad.ok and "worse than the current model" in bad.reason
    assert bad.latency is not None and bad.latency.p95_ms >= 10.0
    over = selftest.check_candidate(slow, inst, 10, 5.0, 20.0, 0.5, None)
    assert not over.ok and "exceeds the budget 5 ms" in over.reason


class Burst(Slow):
    """Slow until the current model has been called ``until`` times (a burst of load on the
    device during the first measurement), and logs its calls."""

    def __init__(self, inner: InferenceSession, delay_s: float, until: int, log: list[str]) -> None:
        super().__init__(inner, delay_s)
        self.until, self.log = until, log

    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        self.log.append("candidate")
        if self.log.count("current") < self.until:
            time.sleep(self.delay)
        return self.inner.infer(feeds)


class Logged(Slow):
    def __init__(self, inner: InferenceSession, log: list[str]) -> None:
        super().__init__(inner, 0.0)
        self.log = log

    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        self.log.append("current")
        return self.inner.infer(feeds)


def test_a_burst_during_one_measurement_does_not_reject_and_runs_alternate(
    tmp_path: Path,
) -> None:
    # CI saw a good candidate rolled back: "p95 7.189 ms is more than 500% worse than the current
    # model's 0.028 ms" - a burst of load hit the candidate's benchmark, measured before the
    # current model's. Now both are measured in turn, and a failing verdict is measured again.
    keys = make_keys(tmp_path / "k")
    vs = VersionStore(tmp_path / "s", keep=1)
    inst = vs.unpack(verify_artifact(make_artifact(tmp_path, keys), [load_public_key(keys.public)]))
    golden = selftest.golden_of(inst)
    log: list[str] = []
    # slow for the golden self-test's calls and the first measurement's, then fast again
    burst = Burst(selftest.load(inst, 1), 0.01 * TIME_SCALE, selftest.WARMUP_RUNS + 20, log)
    current = Logged(selftest.load(inst, 1), log)
    # slack 5 ms: the 10 ms burst fails the first measurement; a loaded CI machine's own
    # millisecond hiccups (seen: p95 1.6 ms vs 0.14 ms) must not fail the second
    res = selftest.check_candidate(burst, inst, 20, 1e4, 20.0, 5.0 * TIME_SCALE, (current, golden))
    assert res.ok, res.reason
    assert res.detail["latency_attempts"] == 2
    timed = log[log.index("current") + selftest.WARMUP_RUNS :]
    assert timed[selftest.WARMUP_RUNS : selftest.WARMUP_RUNS + 6] == ["candidate", "current"] * 3
    # a candidate slow in both measurements is still rejected
    log.clear()
    steady = Burst(selftest.load(inst, 1), 0.01 * TIME_SCALE, 10_000, log)
    bad = selftest.check_candidate(steady, inst, 20, 1e4, 20.0, 5.0 * TIME_SCALE, (current, golden))
    assert not bad.ok and bad.detail["latency_attempts"] == 2, bad.reason
