"""The jetson-orin-nano profile's execution-provider path through a real agent process.

Starts a broker (mosquitto, else the embedded amqtt) and one `edgefleet-agent run` process for
profile jetson-orin-nano (providers from the profile, the v2 HTTP endpoint on a free loopback
port), publishes and deploys an already-built artifact, waits for ACTIVE and HEALTHY, reads the
providers the session runs on from the agent's log, times the HTTP endpoint at batch 1 and 64
(outputs checked against the artifact's golden vectors), sends the `benchmark` command and reads
telemetry. Needs no torch. Ends with one line of JSON.

    python3 bench/jetson_agent_check.py --artifact out/digits-1.0.0-jetson-orin-nano.efa \\
        --key examples/digits/work/keys/edgefleet.pub [--broker-impl amqtt] [--requests 300]
"""

from __future__ import annotations

import argparse
import ast
import atexit
import http.client
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config import CommandsConfig  # noqa: E402
from agent.errors import EdgefleetError  # noqa: E402
from agent.protocol import topics  # noqa: E402
from agent.protocol.artifact import extract_verified, verify_artifact  # noqa: E402
from agent.protocol.golden import GoldenSet  # noqa: E402
from agent.protocol.profile import load_profile  # noqa: E402
from agent.protocol.signing import load_public_key  # noqa: E402
from agent.serve.tensors import NP_DTYPES  # noqa: E402
from agent.telemetry.latency import p50_p95_p99  # noqa: E402
from fleet.localfleet import Procs, free_port, start_broker  # noqa: E402 (no torch/onnx below)
from fleet.trust import Operator, RootSetup, provision  # noqa: E402

DEVICE = "jetson-check-1"
PROVIDERS_RE = re.compile(r"session providers (\[[^\]]*\])")


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Watch:
    """The device's state, events and telemetry topics, collected with arrival times."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.msgs: list[tuple[float, str, dict[str, Any]]] = []
        self.cv = threading.Condition()
        want = [topics.device_topic(DEVICE, leaf) for leaf in ("state", "events", "telemetry")]
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2)

        def on_connect(client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                client.subscribe([(t, 1) for t in want])

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            if msg.topic not in want or not msg.payload:  # amqtt matches loosely
                return
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                return
            with self.cv:
                self.msgs.append((time.monotonic(), msg.topic.rsplit("/", 1)[1], doc))
                self.cv.notify_all()

        self.c.on_connect, self.c.on_message = on_connect, on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.c.connect(host, int(port))
        self.c.loop_start()

    def wait(
        self, leaf: str, pred: Any, timeout: float, after: float = 0.0
    ) -> tuple[float, dict[str, Any]]:
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                for t, lf, doc in self.msgs:
                    if lf == leaf and t >= after and pred(doc):
                        return t, doc
                if time.monotonic() >= end:
                    raise EdgefleetError(
                        f"no matching {leaf} message from {DEVICE} within {timeout:g}s"
                    )
                self.cv.wait(0.2)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def agent_config(run: Path, url: str, trust: RootSetup, port: int, threads: int) -> Path:
    """Profile jetson-orin-nano (its providers and latency budget), endpoint on, short probation."""
    text = f"""device_id = "{DEVICE}"
profile = "jetson-orin-nano"
state_dir = "{run / "state"}"
root_key = "{trust.root_pub.resolve()}"
trust_file = "{trust.trust.resolve()}"
threads = {threads}
profiles_dir = "{ROOT / "device_profiles"}"
log_level = "info"
broker = {{url = "{url}", reconnect_min_s = 1, reconnect_max_s = 2}}
install = {{bench_runs = 50, probation_s = 2.0, probation_interval_s = 0.5}}
telemetry = {{interval_s = 1.0}}
serve = {{enabled = true, host = "127.0.0.1", port = {port}}}
"""
    (run / "agent.toml").write_text(text)
    return run / "agent.toml"


def pct(v: list[float]) -> dict[str, float]:
    """p50/p95 in ms of ``v`` (seconds)."""
    p50, p95, _ = p50_p95_p99([t * 1e3 for t in v])
    return {"p50_ms": round(p50, 4), "p95_ms": round(p95, 4), "n": len(v)}


def http_run(
    port: int,
    model: str,
    golden: GoldenSet,
    dtypes: dict[str, str],
    batch: int,
    n: int,
    atol: float,
    rtol: float,
) -> dict[str, Any]:
    """``n`` keep-alive JSON v2 infer calls at ``batch`` rows (golden inputs, cycled); every
    answer is checked: top-1 against the reference, values against the expected outputs."""
    count = next(iter(golden.inputs.values())).shape[0]
    bodies, rows = [], []
    for i in range(max(1, count // batch) if batch <= count else 1):
        idx = (np.arange(batch) + i * batch) % count
        rows.append(idx)
        inputs = [
            {
                "name": k,
                "shape": list(v[idx].shape),
                "datatype": dtypes[k],
                "data": v[idx].astype(NP_DTYPES[dtypes[k]]).ravel().tolist(),
            }
            for k, v in golden.inputs.items()
        ]
        bodies.append(json.dumps({"inputs": inputs}).encode())
    out_name = next(iter(golden.reference))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    agree = total = 0
    max_diff, within = 0.0, True
    try:
        for i in range(n + 5):
            j = i % len(bodies)
            t0 = time.perf_counter()
            conn.request(
                "POST", f"/v2/models/{model}/infer", bodies[j], {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            data = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                raise EdgefleetError(f"HTTP {resp.status} at batch {batch}: {data[:300]!r}")
            if i >= 5:  # the first 5: warm-up, checked but not timed
                times.append(dt)
            outs = {
                o["name"]: np.asarray(o["data"], np.float64).reshape(o["shape"])
                for o in json.loads(data)["outputs"]
            }
            got, exp = outs[out_name], np.asarray(golden.expected[out_name][rows[j]], np.float64)
            agree += int(np.sum(got.argmax(-1) == golden.reference[out_name][rows[j]].argmax(-1)))
            total += batch
            max_diff = max(max_diff, float(np.max(np.abs(got - exp))))
            within = within and bool(np.all(np.abs(got - exp) <= atol + rtol * np.abs(exp)))
    finally:
        conn.close()
    return {
        **pct(times),
        "top1_agreement": round(agree / total, 4),
        "max_abs_diff": round(max_diff, 6),
        "within_tolerance": within,
    }


def run(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, Any]:
    from fleet.demo import _publish  # publish, read back (bounded) on amqtt
    from fleet.deploy import deploy
    from fleet.device import build_command, send_command
    from fleet.mqtt import broker_config

    profile = load_profile(ROOT / "device_profiles" / "jetson-orin-nano.toml")
    va = verify_artifact(args.artifact, [load_public_key(args.key)])
    m = va.manifest
    extract_verified(va, tmp / "model")
    golden = GoldenSet.load(tmp / "model" / m.golden.file)
    print(
        f"artifact {args.artifact.name}: {m.name} {m.version} {m.profile} {m.precision} (key {va.key_id})"
    )
    if m.profile != profile.name:
        print(
            f"note: the artifact was built for {m.profile}, the agent runs profile {profile.name}"
        )

    url, impl = start_broker(procs, tmp, args.broker_impl)
    print(f"broker: {impl} on {url}")
    watch = Watch(url)
    try:
        port = free_port()
        trust = provision(tmp / "trust", [args.key])
        signer = Operator(trust.operator_key or Path())
        cfg_path = agent_config(tmp, url, trust, port, profile.runtime.threads)
        t0 = time.monotonic()
        procs.start("agent", [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg_path)])
        t_ready, _ = watch.wait("state", lambda d: d.get("online") is True, 60)
        ready_s = t_ready - t0
        print(
            f"agent online after {ready_s:.2f} s (profile {profile.name}, providers asked: "
            f"{list(profile.runtime.execution_providers)}, threads {profile.runtime.threads})"
        )
        cfg = broker_config(url)
        _publish(args.artifact, cfg, verify=impl.startswith("amqtt"))
        t_dep = time.monotonic()
        sha = deploy(cfg, f"{m.name}@{m.version}", signer, device=DEVICE).deployment.sha256

        def state_is(*states: str) -> Any:
            return lambda d: d.get("sha256") == sha and d.get("state") in states

        t_act, ev = watch.wait("events", state_is("ACTIVE", "REJECTED", "ROLLED_BACK"), 180, t_dep)
        if ev["state"] != "ACTIVE":
            raise EdgefleetError(f"deployment {ev['state']}: {ev.get('reason')}")
        active_s = t_act - t_dep
        selftest = ev.get("detail", {})
        print(
            f"ACTIVE after {active_s:.2f} s; on-device self-test + benchmark: {json.dumps(selftest)}"
        )
        t_h, ev = watch.wait("events", state_is("HEALTHY", "ROLLED_BACK"), 60, t_dep)
        if ev["state"] != "HEALTHY":
            raise EdgefleetError(f"probation ended {ev['state']}: {ev.get('reason')}")
        healthy_s = t_h - t_dep
        print(f"HEALTHY after {healthy_s:.2f} s")

        text = (tmp / "agent.log").read_text(errors="replace")
        found = PROVIDERS_RE.findall(text)
        session_providers = list(ast.literal_eval(found[-1])) if found else []
        fallback = [
            ln.strip()
            for ln in text.splitlines()
            if "WARNING" in ln and ("running on" in ln or "retrying on" in ln)
        ]
        print(f"session providers (agent log): {session_providers or 'NOT FOUND in the log'}")
        for ln in fallback:
            print(f"fallback warning: {ln}")
        on_cpu = session_providers[:1] == ["CPUExecutionProvider"]
        if on_cpu:
            print(
                "note: the session runs on the CPU here (no GPU provider loadable on this machine)"
            )

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/v2/models/{m.name}")
        meta = json.loads(conn.getresponse().read())
        conn.close()
        dtypes = {t["name"]: t["datatype"] for t in meta["inputs"]}
        t_http = time.time()
        http_res = {}
        for b in (1, 64):
            r = http_res[b] = http_run(
                port, m.name, golden, dtypes, b, args.requests, m.golden.atol, m.golden.rtol
            )
            print(
                f"HTTP batch {b:>2}: p50 {r['p50_ms']:.3f} ms  p95 {r['p95_ms']:.3f} ms  ({r['n']} calls); "
                f"top-1 agreement {r['top1_agreement']}, max |diff| {r['max_abs_diff']:.3g} "
                f"(atol {m.golden.atol:g}) {'ok' if r['within_tolerance'] else 'OUT OF TOLERANCE'}"
            )

        res = send_command(
            cfg,
            DEVICE,
            build_command(
                "benchmark", None, min(args.requests, CommandsConfig().bench_max_runs), None
            ),
            120,
            signer,
        )
        bench = res.detail
        t_bench = time.monotonic()
        print(
            f"benchmark command: {'ok' if res.ok else 'refused: ' + res.reason}; {json.dumps(bench)}"
        )
        _, tel = watch.wait("telemetry", lambda d: True, 15, t_bench)
        window = tel.get("latency", {})
        with watch.cv:
            counted = sum(
                d.get("latency", {}).get("count", 0)
                for _, lf, d in watch.msgs
                if lf == "telemetry" and d.get("ts", 0) >= t_http
            )
        sent = 2 * (args.requests + 5)  # served requests; the benchmark's runs are not counted
        print(
            f"telemetry after the benchmark: {json.dumps(window)}; inferences counted in telemetry since "
            f"the HTTP load: {counted} of {sent}"
        )
    finally:
        watch.close()

    all_ok = bool(
        session_providers
        and all(
            r["within_tolerance"] and r["top1_agreement"] >= (m.golden.min_top1_agreement or 0.0)
            for r in http_res.values()
        )
        and res.ok
        and counted >= sent
    )
    return {
        "providers_in_session": session_providers,
        "providers_asked": list(profile.runtime.execution_providers),
        "session_on_cpu": on_cpu,
        "fallback_warnings": fallback,
        "broker": impl,
        "ready_s": round(ready_s, 3),
        "active_s": round(active_s, 3),
        "healthy_s": round(healthy_s, 3),
        "selftest": selftest,
        **{
            f"http_{k}_b{b}": r[k]
            for b, r in http_res.items()
            for k in ("p50_ms", "p95_ms", "top1_agreement", "max_abs_diff", "within_tolerance")
        },
        "benchmark_cmd_p50_ms": bench.get("p50_ms"),
        "benchmark_cmd_p95_ms": bench.get("p95_ms"),
        "benchmark_cmd_runs": bench.get("runs"),
        "telemetry_latency": {
            k: window.get(k)
            for k in ("count", "errors", "throughput_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms")
        },
        "telemetry_counted": counted,
        "inferences_sent": sent,
        "requests": args.requests,
        "precision": m.precision,
        "all_ok": all_ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--artifact", type=Path, required=True, help="a built .efa (e.g. for jetson-orin-nano)"
    )
    ap.add_argument(
        "--key", type=Path, required=True, help="the trusted public key the agent verifies with"
    )
    ap.add_argument(
        "--broker-impl",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="auto: mosquitto when installed, else the embedded amqtt",
    )
    ap.add_argument(
        "--requests",
        type=int,
        default=300,
        help="timed HTTP calls per batch size (and benchmark command runs, at most 1000)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs, state)")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        ap.error("--requests must be between 1 and 100000")
    for p in (args.artifact, args.key):
        if not p.is_file():
            ap.error(f"{p}: no such file")

    tmp = Path(tempfile.mkdtemp(prefix="jetson-agent-"))
    procs = Procs(tmp)
    atexit.register(procs.stop_all)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM unwinds like Ctrl-C
    t0 = time.monotonic()
    ok = False
    try:
        out = run(args, procs, tmp)
        ok = bool(out["all_ok"])
    except (EdgefleetError, KeyboardInterrupt) as exc:
        agent_log = tmp / "agent.log"
        tail = (
            agent_log.read_text(errors="replace").splitlines()[-15:] if agent_log.exists() else []
        )
        print("\n".join(f"agent log: {ln}" for ln in tail), file=sys.stderr)
        msg = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(json.dumps({"all_ok": False, "error": msg, "logs": str(tmp)}))
        return 1
    finally:
        procs.stop_all()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs and state kept in {tmp}", file=sys.stderr)
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0 if out["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
