"""`edgefleet demo`: the whole loop on one machine, with real processes, in a few minutes.

A broker (mosquitto, else an embedded amqtt), N agent processes with their own state dirs, the
collector; the digits example built for two profiles, published, rolled out with a canary and
upgraded (the canary's p95 judged against the model it replaces); then a deliberately broken
artifact (corrupted golden vectors, signed) that the canary rejects and the rollout halts on; an
HTML report at the end. Throughout, an "application" (fleet/appload.py) calls every agent's
v2 endpoint, so telemetry carries latency and no request is seen failing across model swaps.
Every process it starts has its own process group and is stopped on exit, Ctrl-C or SIGTERM (and,
on Linux, if the demo itself dies).

The one place the fleet imports the builder (lazily, in fleet/demo_artifacts.py): the demo
builds the digits example itself. `edgefleet demo` therefore needs `edgefleet[builder]`;
every other fleet command runs with `edgefleet[fleet]` alone (docs/architecture.md).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError, UsageError
from agent.protocol import topics
from fleet.appload import AppLoad
from fleet.demo_artifacts import PROFILES, build_artifacts, digits_work, make_broken
from fleet.localfleet import Procs, free_port, start_broker
from fleet.trust import Operator, RootSetup, provision

REPO = Path(__file__).resolve().parents[1]
MARKER = ".edgefleet-demo"
# The application load: modest and bounded (requests per second per device, seconds at most).
APP_RATE, APP_MAX_S = 25.0, 600.0


def agent_config(
    run: Path, device: str, profile: str, url: str, trust: RootSetup, port: int
) -> Path:
    """The agent's config: short telemetry interval, its v2 endpoint on its own loopback port."""
    d = run / "devices" / device
    d.mkdir(parents=True, exist_ok=True)
    text = f"""device_id = "{device}"
profile = "{profile}"
groups = ["{profile}"]
state_dir = "{d / "state"}"
root_key = "{trust.root_pub}"
trust_file = "{trust.trust}"
keep_versions = 2
threads = 1
profiles_dir = "{REPO / "device_profiles"}"
log_level = "info"

[broker]
url = "{url}"
reconnect_min_s = 1
reconnect_max_s = 2

[install]
bench_runs = 20
# demo margins: a busy laptop must not fail a tiny model on latency jitter
max_p95_ms = 50.0
max_p95_regression_pct = 200.0
probation_s = 3.0
probation_interval_s = 1.0

[telemetry]
interval_s = 1.0

[monitor]
# A window is one telemetry second of the demo's modest traffic (25 requests). The digits model
# runs in ~30 us, so the default budget (5% of inference time) observes 1-3 calls a window, too
# few for a verdict; the demo observes every call (still small beside a ~1 ms HTTP request).
min_count = 10
max_overhead = 1.0

[serve]
enabled = true
host = "127.0.0.1"
port = {port}
"""
    path = d / "agent.toml"
    path.write_text(text)
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.clikit", *args]


def _agent_argv(config: Path) -> list[str]:
    exe = shutil.which("edgefleet-agent")
    return (
        [exe, "run", "--config", str(config)]
        if exe
        else [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    )


# ------------------------------------------------------------------------------ the run


def _prepare_out(out: Path) -> Path:
    """OUT/run is recreated on every demo (a fresh fleet); OUT/cache keeps build results."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UsageError(
            f"{out}: exists and was not made by `edgefleet demo`; choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by edgefleet demo\n")
    # Absolute: the agents' configs name keys and state under it, and an agent reads a relative
    # path in its config against the config's own directory.
    run = (out / "run").resolve()
    shutil.rmtree(run, ignore_errors=True)
    for sub in ("logs", "artifacts", "devices"):
        (run / sub).mkdir(parents=True)
    return run


def _states(url: str) -> dict[str, dict[str, Any]]:
    from fleet.mqtt import broker_config, connect

    c = connect(broker_config(url))
    try:
        got = c.retained("edgefleet/v1/devices/+/state", quiet=0.5, limit=5.0)
    finally:
        c.close()
    out = {}
    for topic, payload in got.items():
        with contextlib.suppress(ValueError):
            doc = json.loads(payload)
            # amqtt's wildcard matching is looser than mosquitto's: keep real state messages only
            if (
                topic.endswith("/state")
                and isinstance(doc, dict)
                and isinstance(doc.get("device"), str)
            ):
                out[doc["device"]] = doc
    return out


def _wait_births(url: str, devices: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _states(url)
        if all(st.get(d, {}).get("online") for d in devices):
            return
        time.sleep(0.5)
    raise EdgefleetError(f"agents did not come online within {timeout:g}s (see their logs)")


def _publish(art: Path, cfg: Any, verify: bool, tries: int = 3) -> None:
    """Publish, then read the index entry back; publish again (bounded) if the broker lost it.

    amqtt (the fallback broker) acknowledges before it stores: ``publish_artifact`` now reads its
    last messages back before disconnecting, which fixed the losses seen; with amqtt (``verify``)
    the chunks are still read back as a second check; mosquitto needs none.
    """
    from fleet.mqtt import connect
    from fleet.publish import publish_artifact, read_head

    doc, _ = read_head(art)
    index = topics.artifact_index(doc["name"], doc["version"], doc["profile"])
    for _ in range(tries):
        res = publish_artifact(art, cfg, chunk_size=64 * 1024, force=True)
        if not verify:
            return
        want = {
            index,
            topics.artifact_manifest(res.sha256),
            *(topics.artifact_chunk(res.sha256, i) for i in range(res.chunks)),
        }
        c = connect(cfg)
        try:  # a generous quiet time: a pure-Python broker under load delivers a burst slowly
            got = set(
                c.retained(f"{topics.PREFIX}/artifacts/{res.sha256}/#", quiet=1.0, limit=10.0)
            )
            got |= set(c.retained(index, quiet=1.0, limit=5.0))
        finally:
            c.close()
        if want <= got:
            return
    raise EdgefleetError(f"the broker did not keep all of {art.name} after {tries} publishes")


def _latest_latency(db: Path) -> dict[str, dict[str, float | None]]:
    """Each device's p50/p95 from its latest telemetry window in the collector's database."""
    from fleet.db import open_db
    from fleet.view import rows_from_db

    fdb = open_db(str(db), readonly=True)
    try:
        return {r.device: {"p50_ms": r.p50_ms, "p95_ms": r.p95_ms} for r in rows_from_db(fdb)}
    finally:
        fdb.close()


def run_demo(
    out: Path,
    n_devices: int,
    broker_impl: str,
    say: Callable[[str], None],
    live: bool | None = None,
    drift: bool = False,
) -> dict[str, Any]:
    """The demo (module docstring); with ``drift``, the feedback loop of fleet/demo_drift.py
    after the rollouts, on the first profile's group."""
    from fleet.mqtt import broker_config
    from fleet.rollout.display import RolloutDisplay
    from fleet.rollout.policy import Gate
    from fleet.rollout.runner import staged_rollout

    t_start = time.monotonic()
    run = _prepare_out(out)
    procs = Procs(run / "logs")
    atexit.register(procs.stop_all)
    app: AppLoad | None = None
    try:
        url, impl = start_broker(procs, run, broker_impl)
        say(f"[1/7] broker: {impl} on {url}")
        devices = {
            f"dev-{i + 1}": (PROFILES[1] if i == n_devices - 1 else PROFILES[0])
            for i in range(n_devices)
        }
        db = run / "fleet.db"
        procs.start(
            "collector", _cli("collect", "--broker", url, "--db", str(db), "--stats-every", "5")
        )
        work = digits_work(say)
        key, pub = work / "keys" / "edgefleet.key", work / "keys" / "edgefleet.pub"
        # A root of trust for this run: the example's key releases, an operator key deploys.
        trust = provision(run / "keys", [pub])
        assert trust.operator_key is not None
        signer = Operator(trust.operator_key)
        ports = {dev: free_port() for dev in devices}
        for dev, prof in devices.items():
            procs.start(dev, _agent_argv(agent_config(run, dev, prof, url, trust, ports[dev])))
        # the devices' application: readiness probes until a model is active, then v2 infer requests
        app = AppLoad(ports, work / "eval.npz", rate=APP_RATE, max_seconds=APP_MAX_S).start()
        say(
            f"[2/7] started {n_devices} agents ({', '.join(f'{d}: {p}' for d, p in devices.items())}) "
            f"and the collector"
        )
        t0 = time.monotonic()
        arts = build_artifacts(run / "artifacts", out / "cache", work, say)
        say(f"[3/7] built digits 1.0.0 for {', '.join(PROFILES)} in {time.monotonic() - t0:.1f}s")
        _wait_births(url, list(devices), 60)
        cfg = broker_config(url)
        amqtt = impl.startswith("amqtt")
        for art in arts.values():
            _publish(art, cfg, amqtt)
        say("[4/7] published both artifacts; canary rollout of digits@1.0.0:")
        # demo margins: on a busy laptop a sub-millisecond model's p95 jitters by a millisecond or more
        gate = Gate(max_p95_regression_pct=50.0, p95_slack_ms=5.0)
        results: dict[str, Any] = {}

        def rollout(spec: str, prof: str) -> None:
            members = [d for d, p in devices.items() if p == prof]
            canary = "1" if len(members) > 1 else None
            with RolloutDisplay(f"group {prof}", live=live) as show:
                ro = staged_rollout(
                    cfg,
                    spec,
                    prof,
                    canary,
                    signer,
                    gate=gate,
                    wait=True,
                    timeout=90,
                    on_change=show,
                )
            results[f"{spec} to group {prof}"] = ro.summary()
            if ro.phase != "done":
                raise EdgefleetError(f"rollout of {spec} to {prof} {ro.phase}: {ro.reason}")
            p95 = "; ".join(
                f"{d} p95 {v.p95_ms:.3f} ms vs {v.current_p95_ms:.3f} ms before"
                for d, v in sorted(ro.devices.items())
                if v.p95_ms is not None and v.current_p95_ms is not None
            )
            say(
                f"  group {prof}: {ro.phase}"
                + (f" (canary {', '.join(ro.canaries)} first)" if ro.canaries else "")
                + (f"; on-device {p95}" if p95 else "")
            )

        for prof in PROFILES:
            rollout("digits@1.0.0", prof)
        up = build_artifacts(
            run / "artifacts", out / "cache", work, lambda m: None, "1.0.1", PROFILES[:1]
        )
        _publish(up[PROFILES[0]], cfg, amqtt)
        say(
            f"[5/7] upgrade digits@1.0.1 on {PROFILES[0]}: the canary's p95 is measured against the model it replaces"
        )
        rollout("digits@1.0.1", PROFILES[0])
        broken = make_broken(up[PROFILES[0]], run / "artifacts", key, "1.1.0")
        _publish(broken, cfg, amqtt)
        say(
            f"[6/7] broken artifact {broken.name} (golden vectors off by 5.0, validly signed): canary rollout"
        )
        with RolloutDisplay(f"group {PROFILES[0]}", live=live) as show:
            bad = staged_rollout(
                cfg,
                "digits@1.1.0",
                PROFILES[0],
                "1",
                signer,
                gate=gate,
                timeout=90,
                on_change=show,
            )
        results[f"digits@1.1.0 to group {PROFILES[0]}"] = bad.summary()
        if bad.phase != "halted":
            raise EdgefleetError(f"the broken artifact was not stopped: rollout {bad.phase}")
        say(f"  halted as it should: {bad.reason}")
        loop = None
        if drift:
            from fleet.demo_drift import Fleet, run_drift_loop

            loop = run_drift_loop(
                Fleet(
                    broker=cfg,
                    db=db,
                    run=run,
                    cache=out / "cache",
                    work=work,
                    group=PROFILES[0],
                    devices=[d for d, p in devices.items() if p == PROFILES[0]],
                    signer=signer,
                    app=app,
                    current="digits@1.0.1",
                    say=say,
                    rollout=rollout,
                    publish=lambda art: _publish(art, cfg, amqtt),
                )
            )
        time.sleep(2.0)  # a last telemetry interval reaches the collector
        states = _states(url)
        collector = next(p for n, p in procs.procs if n == "collector")
        procs.stop(collector)  # SIGTERM: it writes what it holds, then the report reads the db
        app.stop()  # after the collector: the last window it stored still had traffic
        latest = _latest_latency(db)
        report = run / "report.html"
        rep = subprocess.run(
            _cli("fleet", "report", "--db", str(db), "--html", str(report)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if rep.returncode != 0:
            raise EdgefleetError(
                f"fleet report failed: {rep.stderr.strip().splitlines()[-1:] or rep.returncode}"
            )
        say(f"[7/7] report written: {report}")
        summary = {
            "ok": True,
            "broker": impl,
            "seconds": round(time.monotonic() - t_start, 1),
            "report": str(report),
            "logs": str(run / "logs"),
            "db": str(db),
            "devices": {
                d: {
                    "profile": devices[d],
                    "online": s.get("online"),
                    "active": (s.get("active") or {}).get("version"),
                    **latest.get(d, {}),
                }
                for d, s in sorted(states.items())
            },
            "rollouts": {
                k: {"phase": v["phase"], "canaries": v["canaries"], "reason": v["reason"]}
                for k, v in results.items()
            },
            "app": app.summary(),
        }
        if loop is not None:
            summary["drift_loop"] = loop
        return summary
    finally:
        if app is not None:
            app.stop()
        procs.stop_all()
