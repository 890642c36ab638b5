"""`edgefleet demo` end to end (real broker, agent processes, collector, build), and that no process
it started survives its end or a Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fleet.localfleet import mosquitto_path
from tests.agent_helpers import REPO, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _deliver_sigint() -> None:  # runs in the child between fork and exec
    """SIGINT at its default, as for a terminal's foreground job that gets Ctrl-C. A runner that
    starts the suite as a background job has SIGINT ignored, children inherit that, and Python
    then never raises KeyboardInterrupt: the Ctrl-C test would test nothing but the runner."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Watched:
    """The demo as a child process; remembers every descendant it ever saw, and its stderr."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "agent.clikit", "demo", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_deliver_sigint,
        )
        self.seen: dict[int, str] = {}
        self._procs: dict[int, psutil.Process] = {}  # psutil refuses to signal a reused pid
        self.err: list[str] = []
        self.out = ""
        threading.Thread(target=self._read_err, daemon=True).start()

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever the test's outcome, the demo and every descendant it was seen with are gone."""
        self.snapshot()
        stop_process(self.p, signal.SIGTERM, 30)
        for c in self._procs.values():
            with contextlib.suppress(psutil.Error):
                c.kill()

    def _read_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.err.append(line)

    def snapshot(self) -> None:
        try:
            for c in psutil.Process(self.p.pid).children(recursive=True):
                self.seen.setdefault(c.pid, " ".join(c.cmdline())[:400])
                self._procs.setdefault(c.pid, c)
        except psutil.Error:
            pass

    def wait(self, timeout: float, until: str | None = None) -> int | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.p.poll() is None:
            self.snapshot()
            if until is not None and any(until in line for line in self.err):
                return None
            time.sleep(0.3)
        if self.p.poll() is None:
            self.p.kill()
            raise AssertionError(
                f"demo still running after {timeout}s:\n{''.join(self.err)[-3000:]}"
            )
        assert self.p.stdout is not None
        self.out = self.p.stdout.read()
        return self.p.returncode

    def survivors(self, grace: float = 10.0) -> list[str]:
        """Descendants still running ``grace`` s after the demo ended (they get SIGTERM, not SIGKILL)."""
        end = time.monotonic() + grace
        while True:
            alive = []
            for pid, cmd in self.seen.items():
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {cmd}")
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.monotonic() > end:
                return alive
            time.sleep(0.2)


IMPLS = ["amqtt"] + (["mosquitto"] if mosquitto_path() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_demo_runs_the_whole_loop_and_leaves_nothing(tmp_path: Path, impl: str) -> None:
    with Watched("--out", str(tmp_path / "demo"), "--broker-impl", impl, "--json") as w:
        rc = w.wait(180)
        assert rc == 0, "".join(w.err)[-4000:]
        s = json.loads(w.out.strip().splitlines()[-1])
        assert s["ok"] and s["broker"].startswith(impl)
        good = s["rollouts"]["digits@1.0.0 to group x86-ipc"]
        assert good["phase"] == "done" and good["canaries"] == ["dev-1"]
        assert s["rollouts"]["digits@1.0.0 to group generic-cpu"]["phase"] == "done"
        broken = s["rollouts"]["digits@1.1.0 to group x86-ipc"]
        assert broken["phase"] == "halted" and "self-test failed" in broken["reason"]
        upgrade = s["rollouts"]["digits@1.0.1 to group x86-ipc"]
        assert upgrade["phase"] == "done" and upgrade["canaries"] == ["dev-1"]
        # the broken 1.1.0 never replaced the upgrade anywhere
        assert {d: v["active"] for d, v in s["devices"].items()} == {
            "dev-1": "1.0.1",
            "dev-2": "1.0.1",
            "dev-3": "1.0.0",
        }
        report = Path(s["report"]).read_text()
        assert all(d in report for d in ("dev-1", "dev-2", "dev-3"))
        # the application called every device once its first model was active, and not one request failed
        # across the canary rollouts, the upgrade's model swap and the halted broken artifact
        app = s["app"]
        assert set(app["devices"]) == {"dev-1", "dev-2", "dev-3"}
        for d, a in app["devices"].items():
            assert a["ready_s"] is not None and a["ok"] > 0 and a["failed"] == 0, (d, a)
            assert a["ok"] == a["requests"] and a["correct"] > 0.9 * a["ok"], (d, a)
        assert app["failed"] == 0 and app["ok"] == sum(a["ok"] for a in app["devices"].values())
        # so the agents' telemetry carried latency windows: every device has some in the collector's db,
        # the demo's summary shows the latest p50/p95, and the report's fleet summary has a median p95
        with sqlite3.connect(s["db"]) as db:
            windows = dict(
                db.execute(
                    "SELECT device, COUNT(*) FROM telemetry WHERE count > 0 AND p95_ms > 0 "
                    "AND p50_ms <= p95_ms GROUP BY device"
                ).fetchall()
            )
        assert set(windows) == {"dev-1", "dev-2", "dev-3"} and min(windows.values()) >= 3, windows
        assert all(
            v["p50_ms"] is not None and v["p95_ms"] is not None for v in s["devices"].values()
        ), s["devices"]
        assert re.search(r"<b[^>]*>[0-9.]+ ms</b><span>median p95</span>", report), (
            "the report has no median p95"
        )
        charts = re.findall(r'aria-label="inference latency">(.*?)</svg>', report)
        assert len(charts) == 3 and all(
            "no data" not in c and c.count("<polyline") == 2 for c in charts
        ), charts
        # broker, collector and three agents ran as children, and none outlived the demo
        assert len(w.seen) >= 5, w.seen
        assert w.survivors() == []


def test_demo_drift_closes_the_loop(tmp_path: Path) -> None:
    """Issue 13's loop on real processes: inputs shift -> drift events and report chart ->
    capture on (signed deployment) -> export -> retrain and rebuild with the captured data ->
    canary rollout -> drift back under the threshold."""
    impl = IMPLS[-1]  # mosquitto where installed
    with Watched("--out", str(tmp_path / "demo"), "--broker-impl", impl, "--drift", "--json") as w:
        rc = w.wait(480)
        assert rc == 0, "".join(w.err)[-4000:]
        s = json.loads(w.out.strip().splitlines()[-1])
        loop = s["drift_loop"]
        # both devices of the shifted group reported drift within seconds; the other group did not
        assert set(loop["drift_events"]) == {"dev-1", "dev-2"}, loop
        assert all(e["after_s"] < 30 for e in loop["drift_events"].values()), loop
        with sqlite3.connect(s["db"]) as db:
            drifted = {r[0] for r in db.execute("SELECT device FROM events WHERE kind = 'drift'")}
            captured = dict(
                db.execute("SELECT device, COUNT(*) FROM samples GROUP BY device").fetchall()
            )
            labelled = db.execute("SELECT COUNT(*) FROM samples WHERE label IS NULL").fetchone()
        assert "dev-3" not in drifted
        # capture was on for the shifted group only, every sample labelled by the application
        assert set(captured) == {"dev-1", "dev-2"} and labelled == (0,), captured
        assert loop["captured"]["samples"] >= 500 and loop["captured"]["unique"] >= 200, loop
        report = Path(loop["report"]).read_text()
        assert 'id="drift-episodes"' in report and "model drift (max score per window)" in report
        # the retrained model is better on captured samples it never saw, and was rolled out
        rt = loop["retrain"]
        assert rt["holdout_top1_after"] > rt["holdout_top1_before"] + 0.1, rt
        ro = s["rollouts"]["digits@1.2.0 to group x86-ipc"]
        assert ro["phase"] == "done" and ro["canaries"] == ["dev-1"], ro
        assert {d: v["active"] for d, v in s["devices"].items()} == {
            "dev-1": "1.2.0",
            "dev-2": "1.2.0",
            "dev-3": "1.0.0",
        }
        # drift back under the threshold on the new version, and its answers are better
        assert set(loop["drift_after"]) == {"dev-1", "dev-2"}
        assert all(v < loop["threshold"] for v in loop["drift_after"].values()), loop
        top1 = loop["app_top1"]
        assert top1["shifted_next_version"] > top1["shifted_old_model"] + 0.1, top1
        assert s["app"]["failed"] == 0, s["app"]
        assert w.survivors() == []


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 130), (signal.SIGKILL, -9)]
)
def test_ctrl_c_or_kill_stops_every_process(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    """Ctrl-C and SIGTERM unwind through the cleanup; even SIGKILL leaves nothing (PDEATHSIG)."""
    if sig == signal.SIGKILL and sys.platform != "linux":
        pytest.skip("parent-death signal is Linux only")
    with Watched("--out", str(tmp_path / "demo"), "--broker-impl", "amqtt") as w:
        assert w.wait(120, until="[2/7]") is None, "".join(w.err)
        end = (
            time.monotonic() + 10
        )  # a just-forked child shows the demo's command line until it execs
        while True:
            w.seen.clear()
            w.snapshot()
            agents = [
                c for c in w.seen.values() if "agent.toml" in c
            ]  # the agents, not agent.clikit collect
            if len(agents) == 3 or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert len(agents) == 3, w.seen
        w.p.send_signal(sig)
        rc = w.wait(60)
        assert rc == code, "".join(w.err)[-2000:]
        assert w.survivors() == []


def test_auto_broker_falls_back_to_amqtt_without_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.errors import UsageError
    from fleet import localfleet
    from fleet.mqtt import SyncClient, broker_config

    monkeypatch.setattr(localfleet, "mosquitto_path", lambda: None)
    with pytest.raises(UsageError, match="mosquitto is not installed"):
        localfleet.start_broker(localfleet.Procs(tmp_path), tmp_path, "mosquitto")
    procs = localfleet.Procs(tmp_path)
    url, impl = localfleet.start_broker(procs, tmp_path, "auto")
    try:
        assert impl.startswith("amqtt")
        big = bytes(range(256)) * 4096  # 1 MiB, a chunk's size: retained and read back whole
        with SyncClient(broker_config(url)) as c:
            c.publish("edgefleet/v1/artifacts/index/x/1.0.0/p", big, retain=True)
            c.flush()
        with SyncClient(broker_config(url)) as c:
            assert c.retained("edgefleet/v1/artifacts/index/x/1.0.0/+", limit=5.0) == {
                "edgefleet/v1/artifacts/index/x/1.0.0/p": big
            }
        pid = procs.procs[0][1].pid
    finally:
        procs.stop_all()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
