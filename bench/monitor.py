"""Drift monitor: cost on the inference path, memory, detection speed, false alarms, privacy.

Builds a digits CNN artifact (random weights, as bench/agent_overhead.py) with a reference
profile computed by the builder's code on 1000 sklearn digits, then measures:

- monitor_overhead_ratio: in-process LocalModel.infer p50 with monitoring on / raw
  session.infer p50, batch 1, interleaved rounds (the order rotates); LocalModel without a
  monitor is timed alongside (local_no_monitor_ratio) so the monitor's own share shows.
- monitor_rss_mb: memory the monitor holds, by tracemalloc (numpy's allocations included) over
  building it from reference.json and 20000 observations; arrays only, no Python interpreter.
- drift_detect_windows: windows of 200 observations from the start of a shift (inputs x3) to
  the drift event (default thresholds: PSI 0.25 for 2 windows).
- false_drift_events: events over 150 windows of 200 held-out in-distribution digits.
- raw_inputs_leaked: a real agent process and mosquitto; HTTP inferences with a distinctive
  input value; a '#' subscriber counts messages on any topic that contain it (as text or as
  float32 bytes).

    python3 bench/monitor.py | tail -1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent_overhead import digits_cnn, digits_inputs, install, write_config  # noqa: E402

from tests.agent_helpers import Broker, free_port, make_keys  # noqa: E402

TARGETS = {
    "monitor_overhead_ratio": 1.10,
    "monitor_rss_mb": 5.0,
    "drift_detect_windows": 3,
    "false_drift_events": 0,
    "raw_inputs_leaked": 0,
}
WINDOW = 200
MARK = 7.654321  # the distinctive input value of the privacy check


def say(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def build(work: Path, key: Path, ref_x: np.ndarray) -> tuple[Path, dict[str, Any]]:
    import onnxruntime as ort

    from agent.protocol.golden import GoldenSet
    from agent.protocol.manifest import (
        FORMAT_VERSION,
        Golden,
        Manifest,
        ModelInfo,
        MonitorRef,
        Recipe,
        TensorSpec,
    )
    from agent.protocol.signing import load_private_key
    from builder.package import file_entry, write_artifact
    from builder.reference import REFERENCE_FILE, build_reference, encode_reference

    model, golden, refp = work / "model.onnx", work / "golden.npz", work / REFERENCE_FILE
    digits_cnn(model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = ref_x[:8]
    y = sess.run(["y"], {"x": x})[0]
    GoldenSet({"x": x}, {"y": y}, {"y": y}).save(golden)
    ref = build_reference({"x": ref_x}, {"y": sess.run(["y"], {"x": ref_x})[0]}, "classification")
    refp.write_bytes(encode_reference(ref))
    files = {"model.onnx": model, "golden.npz": golden, REFERENCE_FILE: refp}
    m = Manifest(
        format_version=FORMAT_VERSION,
        name="digits",
        version="1.0.0",
        profile="bench-cpu",
        runtime="onnxruntime",
        precision="fp32",
        task="classification",
        created="2026-01-01T00:00:00Z",
        builder_version="bench",
        model=ModelInfo(
            file="model.onnx",
            inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 1, 8, 8])],
            outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 10])],
        ),
        files={k: file_entry(p) for k, p in files.items()},
        metrics={},
        recipe=Recipe(name="bench", steps=[]),
        golden=Golden(file="golden.npz", count=8, atol=1e-4, rtol=1e-4, min_top1_agreement=0.9),
        monitor=MonitorRef(file=REFERENCE_FILE),
    )
    art = write_artifact(work / "digits-1.0.0.efa", m, files, load_private_key(key))
    return art, ref


def overhead(
    model: Path, ref: dict[str, Any], x: np.ndarray, rounds: int, calls: int
) -> dict[str, float]:
    from agent.monitor.monitor import Monitor
    from agent.runtime import load_session
    from agent.serve.holder import Loaded, SessionHolder
    from agent.serve.local import LocalModel
    from agent.telemetry.latency import LatencyRecorder

    sess = load_session("onnxruntime", model, threads=1)
    on, off = SessionHolder(), SessionHolder()
    mon = Monitor(ref)
    on.swap(Loaded("digits", "1.0.0", "0" * 64, "onnxruntime", sess, monitor=mon))
    off.swap(Loaded("digits", "1.0.0", "0" * 64, "onnxruntime", sess))
    local_on, local_off = LocalModel(on, LatencyRecorder()), LocalModel(off, LatencyRecorder())
    feeds = [{"x": x[i : i + 1]} for i in range(len(x))]
    paths = {"raw": sess.infer, "monitor": local_on.infer, "no_monitor": local_off.infer}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for f in feeds[:200]:
        for fn in paths.values():
            fn(f)
    order = list(paths)
    pc = time.perf_counter
    for r in range(rounds):
        order = order[1:] + order[:1]
        for k in order:
            fn, ts = paths[k], times[k]
            for i in range(calls):
                f = feeds[(r * calls + i) % len(feeds)]
                t0 = pc()
                fn(f)
                ts.append(pc() - t0)
    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    say(
        f"p50 ms: raw {p50['raw']:.4f}  local+monitor {p50['monitor']:.4f}  local {p50['no_monitor']:.4f}"
    )
    say(
        f"monitor observed {mon.count} of {len(times['monitor']) + 200} calls (cost-bounded sampling)"
    )
    return {
        "raw_p50_ms": round(p50["raw"], 4),
        "monitor_p50_ms": round(p50["monitor"], 4),
        "monitor_overhead_ratio": round(p50["monitor"] / p50["raw"], 4),
        "local_no_monitor_ratio": round(p50["no_monitor"] / p50["raw"], 4),
        "calls_per_path": len(times["raw"]),
    }


def memory(ref: dict[str, Any], x: np.ndarray, y: np.ndarray) -> float:
    from agent.monitor.monitor import Monitor

    blob = json.dumps(ref)
    tracemalloc.start()
    mon = Monitor(json.loads(blob))
    for i in range(20000):
        j = i % len(x)
        mon.observe({"x": x[j : j + 1]}, {"y": y[j : j + 1]})
    mon.window()
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    say(
        f"monitor memory: {cur / 2**20:.3f} MB held, {peak / 2**20:.3f} MB peak (tracemalloc); arrays {mon.nbytes} B"
    )
    return round(peak / 2**20, 3)


def windows(ref: dict[str, Any], sess: Any, held: np.ndarray, n_ok: int) -> tuple[int, int]:
    """(false drift events over n_ok in-distribution windows, windows to detect a x3 shift)."""
    from agent.monitor.monitor import Monitor

    mon = Monitor(ref)
    rng = np.random.default_rng(0)
    y_held = sess.run(["y"], {"x": held})[0]

    def window(scale: float) -> dict[str, Any] | None:
        for i in rng.integers(0, len(held), WINDOW):
            x = held[i : i + 1] * scale
            y = y_held[i : i + 1] if scale == 1.0 else sess.run(["y"], {"x": x})[0]
            mon.observe({"x": x}, {"y": y})
        return mon.window()

    worst = 0.0
    for _ in range(n_ok):
        b = window(1.0)
        assert b is not None
        worst = max(worst, b["drift"]["max"])
    false = len(mon.take_events())
    say(
        f"{n_ok} in-distribution windows of {WINDOW}: {false} drift events, worst max score {worst:.3f}"
    )
    for k in range(1, 20):
        b = window(3.0)
        if mon.take_events():
            say(
                f"inputs x3: drift event after {k} windows (max score {b['drift']['max'] if b else 0:.2f})"
            )
            return false, k
    return false, 99


def privacy(tmp: Path, artifact: Path, keys: Any) -> tuple[int, int, int]:
    """(messages containing the raw input value, messages seen, drift events seen)."""
    import http.client

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = Broker(tmp / "broker")
    proc: subprocess.Popen[bytes] | None = None
    msgs: list[tuple[str, bytes]] = []
    try:
        broker.start()
        port = free_port()
        state, config = tmp / "state", tmp / "agent.toml"
        install(artifact, state, keys.public)
        write_config(config, state, keys.public, broker.url, port)
        with config.open("a") as fh:
            fh.write("[telemetry]\ninterval_s = 1.0\n[monitor]\nmin_count = 10\n")
        c = mqtt.Client(CallbackAPIVersion.VERSION2)
        c.on_connect = lambda cl, *_a: cl.subscribe("#", qos=1)
        c.on_message = lambda _c, _u, m: msgs.append((m.topic, bytes(m.payload)))
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        log = (tmp / "agent.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=log,
        )
        x = np.full((1, 1, 8, 8), MARK, np.float32)
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        deadline = time.monotonic() + 60
        sent = 0
        while time.monotonic() < deadline:
            try:
                h = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                h.request("POST", "/v2/models/digits/infer", body=body)
                r = h.getresponse()
                r.read()
                h.close()
                sent += r.status == 200
            except OSError:
                time.sleep(0.1)
            drift = [p for t, p in msgs if t.endswith("/events") and b'"drift"' in p]
            if drift and sent > 500 and time.monotonic() > deadline - 50:
                break
        time.sleep(1.5)  # a few more telemetry windows
        c.loop_stop()
        c.disconnect()
        needles = [f"{MARK}".encode(), f"{MARK:.5f}".encode()[:-1], np.float32(MARK).tobytes()]
        leaked = sum(any(n in p for n in needles) for _t, p in msgs)
        drift = sum(1 for t, p in msgs if t.endswith("/events") and b'"kind":"drift"' in p)
        blocks = sum(1 for t, p in msgs if t.endswith("/telemetry") and b'"monitor"' in p)
        say(
            f"privacy: {sent} inferences, {len(msgs)} messages on '#' ({blocks} with a monitor block, {drift} drift events), {leaked} with the raw value"
        )
        return leaked, len(msgs), drift
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds (default 40)")
    ap.add_argument("--calls", type=int, default=60, help="calls per path per round (default 60)")
    ap.add_argument(
        "--windows", type=int, default=150, help="in-distribution windows (default 150)"
    )
    args = ap.parse_args()
    import onnxruntime as ort

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="ef-bench-monitor-", dir="/tmp"))
    keys = make_keys(tmp / "keys")
    allx = digits_inputs(1797)
    ref_x, held = allx[:1000], allx[1000:]
    (tmp / "work").mkdir()
    artifact, ref = build(tmp / "work", keys.private, ref_x)
    say(
        f"artifact {artifact.name}: {artifact.stat().st_size} bytes, reference.json {(tmp / 'work' / 'reference.json').stat().st_size} bytes"
    )
    model = tmp / "work" / "model.onnx"
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {"bench": "monitor"}
    out.update(overhead(model, ref, held, args.rounds, args.calls))
    out["monitor_rss_mb"] = memory(ref, held, sess.run(["y"], {"x": held})[0])
    out["monitor_rss_method"] = "tracemalloc peak of the monitor's allocations"
    out["false_drift_events"], out["drift_detect_windows"] = windows(ref, sess, held, args.windows)
    out["window_size"] = WINDOW
    out["raw_inputs_leaked"], out["messages_watched"], out["drift_events_seen"] = privacy(
        tmp / "live", artifact, keys
    )
    out["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    out["targets"] = TARGETS
    print(json.dumps(out))


if __name__ == "__main__":
    main()
