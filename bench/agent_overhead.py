"""What the agent adds to an inference, and what it costs while idle.

Side by side in one run, on the digits CNN (1x8x8 -> 10, the architecture of
examples/digits/model.py built directly in ONNX) and real digits images (scikit-learn's
bundled set): raw onnxruntime ``session.run``, the agent's in-process path (``Agent.infer``:
holder + LatencyRecorder) and the HTTP endpoint of a real agent process (keep-alive client,
JSON tensors), in interleaved rounds. Then the agent process's idle RSS and CPU, and the time
from its start to READY=1 on a NOTIFY_SOCKET this script owns.

    python3 bench/agent_overhead.py             # about a minute (30 s of it idle CPU)
    python3 bench/agent_overhead.py --idle-s 5  # quicker, noisier CPU figure
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.agent_helpers import Broker, free_port, make_keys  # noqa: E402

TARGETS = {
    "inproc_overhead_ratio": 1.05,
    "http_overhead_ms": 0.5,
    "idle_rss_mb": 60.0,
    "idle_cpu_percent": 1.0,
    "ready_s": 2.0,
}


def say(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def digits_cnn(path: Path, seed: int = 0) -> None:
    """DigitsCNN (width 32; batch norm folded into the convs, as onnxruntime would) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    inits = [
        w("c1", 32, 1, 3, 3),
        w("b1", 32),
        w("c2", 64, 32, 3, 3),
        w("b2", 64),
        w("c3", 128, 64, 3, 3),
        w("b3", 128),
        w("f1", 128, 512),
        w("g1", 128),
        w("f2", 10, 128),
        w("g2", 10),
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "c1", "b1"], ["h1"], pads=pads),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2", "b2"], ["h2"], pads=pads),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "c3", "b3"], ["h3"], pads=pads),
        helper.make_node("Relu", ["h3"], ["r3"]),
        helper.make_node("MaxPool", ["r3"], ["p3"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p3"], ["fl"]),
        helper.make_node("Gemm", ["fl", "f1", "g1"], ["d1"], transB=1),
        helper.make_node("Relu", ["d1"], ["e1"]),
        helper.make_node("Gemm", ["e1", "f2", "g2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def digits_inputs(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    x: np.ndarray = load_digits().images[:n].astype(np.float32) / 16.0
    return x.reshape(n, 1, 8, 8)


def build_artifact(work: Path, key: Path) -> Path:
    """A signed artifact, built like tests/agent_helpers.make_artifact."""
    import onnxruntime as ort

    from agent.protocol.golden import GoldenSet
    from agent.protocol.manifest import (
        FORMAT_VERSION,
        Golden,
        Manifest,
        ModelInfo,
        Recipe,
        TensorSpec,
    )
    from agent.protocol.signing import load_private_key
    from builder.package import file_entry, write_artifact

    model, golden = work / "model.onnx", work / "golden.npz"
    digits_cnn(model)
    x = digits_inputs(8)
    y = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    GoldenSet({"x": x}, {"y": y}, {"y": y}).save(golden)
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
        files={"model.onnx": file_entry(model), "golden.npz": file_entry(golden)},
        metrics={},
        recipe=Recipe(name="bench", steps=[]),
        golden=Golden(file="golden.npz", count=8, atol=1e-4, rtol=1e-4, min_top1_agreement=0.9),
    )
    return write_artifact(
        work / "digits-1.0.0.efa",
        m,
        {"model.onnx": model, "golden.npz": golden},
        load_private_key(key),
    )


def install(artifact: Path, state: Path, pub: Path) -> None:
    """Unpack and activate as the agent would have after a deployment (a restart then serves it)."""
    from agent.protocol.artifact import verify_artifact
    from agent.protocol.signing import load_public_key
    from agent.store.versions import VersionStore

    store = VersionStore(state, keep=1)
    store.activate(store.unpack(verify_artifact(artifact, [load_public_key(pub)])))


def write_config(path: Path, state: Path, pub: Path, broker: str, port: int) -> None:
    from fleet.trust import provision

    trust = provision(path.parent / "trust", [pub])
    path.write_text(
        "\n".join(
            [
                'device_id = "bench"',
                'profile = "bench-cpu"',
                f'state_dir = "{state}"',
                f'root_key = "{trust.root_pub}"',
                f'trust_file = "{trust.trust}"',
                'runtimes = ["onnxruntime"]',
                "threads = 1",
                "[broker]",
                f'url = "{broker}"',
                "[install]",
                "max_p95_ms = 1000.0",
                "probation_s = 0",
                "[serve]",
                f"port = {port}",
            ]
        )
        + "\n"
    )


def start_agent(config: Path, notify: Path, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    """Start the agent; return it and the seconds until READY=1 arrived on our NOTIFY_SOCKET."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(notify))
    s.settimeout(60)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            msg = s.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                return proc, time.monotonic() - t0
    finally:
        s.close()


FLOOR = """
import re, sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], sess_options=o, providers=["CPUExecutionProvider"])
s.run(["y"], {"x": np.zeros((1, 1, 8, 8), np.float32)})
print(int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)))
"""


def floor_rss_mb(model: Path) -> float:
    """RSS of a bare python that imports numpy + onnxruntime and runs the same model: the floor."""
    out = subprocess.run(
        [sys.executable, "-c", FLOOR, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return int(out.split()[-1]) / 1024


def rss_split_mb(pid: int) -> dict[str, float]:
    st = Path(f"/proc/{pid}/status").read_text()
    return {k: int(st.split(k + ":")[1].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


class HttpClient:
    def __init__(self, port: int, x: np.ndarray) -> None:
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": list(x.shape),
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        self.headers = {"Content-Type": "application/json"}

    def __call__(self) -> None:
        self.c.request("POST", "/v2/models/digits/infer", self.body, self.headers)
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds (default 40)")
    ap.add_argument("--calls", type=int, default=50, help="calls per path per round (default 50)")
    ap.add_argument(
        "--idle-s", type=float, default=30.0, help="seconds of idle CPU measurement (default 30)"
    )
    args = ap.parse_args()
    import onnxruntime as ort
    import psutil

    from agent.config import load_config
    from agent.deploy.agent import Agent
    from agent.deploy.policy import resolve_policy
    from agent.transport.fake import FakeTransport

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="ef-bench-", dir="/tmp"))
    broker = Broker(tmp / "broker")
    proc: subprocess.Popen[bytes] | None = None
    try:
        keys = make_keys(tmp / "keys")
        (tmp / "work").mkdir()
        artifact = build_artifact(tmp / "work", keys.private)
        say(f"artifact {artifact.name}: {artifact.stat().st_size} bytes")
        broker.start()
        port = free_port()
        state, config = tmp / "state", tmp / "agent.toml"
        install(artifact, state, keys.public)
        write_config(config, state, keys.public, broker.url, port)

        proc, ready_s = start_agent(config, tmp / "notify", tmp / "agent.log")
        say(f"agent READY after {ready_s:.2f} s")
        x = digits_inputs(1)
        feeds = {"x": x}

        # in-process: a real Agent (fake transport) on a copy of the state dir
        shutil.copytree(state, tmp / "state2", symlinks=True)
        cfg2 = load_config(config).model_copy(update={"state_dir": tmp / "state2"})
        agent = Agent(cfg2, resolve_policy(cfg2), FakeTransport())
        agent.start()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        raw_sess = ort.InferenceSession(
            str(state / "active" / "model.onnx"),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        client = HttpClient(port, x)
        paths: dict[str, Callable[[], object]] = {
            "raw": lambda: raw_sess.run(["y"], feeds),
            "inproc": lambda: agent.infer(feeds),
            "http": client,
        }
        np.testing.assert_allclose(
            np.asarray(agent.infer(feeds)["y"]), raw_sess.run(["y"], feeds)[0], rtol=1e-5, atol=1e-6
        )
        for fn in paths.values():  # warm-up
            for _ in range(50):
                fn()
        times: dict[str, list[float]] = {k: [] for k in paths}
        order = list(paths)
        for r in range(args.rounds):
            for name in order[r % 3 :] + order[: r % 3]:  # rotate the order each round
                fn, out = paths[name], times[name]
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1000.0)
        p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
        p95 = {k: float(np.percentile(v, 95)) for k, v in times.items()}
        for k in paths:
            say(f"{k:7s} p50 {p50[k]:.4f} ms  p95 {p95[k]:.4f} ms  ({len(times[k])} calls)")
        rec = agent.latency.window()
        client.c.close()

        time.sleep(2.0)  # let the agent settle after the load
        p = psutil.Process(proc.pid)
        rss_mb = p.memory_info().rss / 2**20
        split = rss_split_mb(proc.pid)
        floor = floor_rss_mb(state / "active" / "model.onnx")
        c0, w0 = p.cpu_times(), time.monotonic()
        time.sleep(args.idle_s)
        c1, w1 = p.cpu_times(), time.monotonic()
        cpu = 100.0 * ((c1.user - c0.user) + (c1.system - c0.system)) / (w1 - w0)
        say(
            f"agent idle: RSS {rss_mb:.1f} MB (anon {split['RssAnon']:.1f}, file {split['RssFile']:.1f}; "
            f"bare python + numpy + onnxruntime + this model: {floor:.1f} MB), CPU {cpu:.2f}% over {w1 - w0:.0f} s"
        )
        result: dict[str, object] = {
            "bench": "agent_overhead",
            "model": "digits_cnn fp32 batch 1",
            "raw_p50_ms": round(p50["raw"], 4),
            "inproc_p50_ms": round(p50["inproc"], 4),
            "http_p50_ms": round(p50["http"], 4),
            "http_p95_ms": round(p95["http"], 4),
            "inproc_overhead_ratio": round(p50["inproc"] / p50["raw"], 4),
            "http_overhead_ms": round(p50["http"] - p50["raw"], 4),
            "idle_rss_mb": round(rss_mb, 1),
            "idle_rss_anon_mb": round(split["RssAnon"], 1),
            "idle_rss_file_mb": round(split["RssFile"], 1),
            "floor_rss_mb": round(floor, 1),
            "idle_cpu_percent": round(cpu, 3),
            "ready_s": round(ready_s, 3),
            "recorded_inproc": rec.count,
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        }
        met = {k: float(result[k]) <= t for k, t in TARGETS.items()}  # type: ignore[arg-type]
        result["targets_met"] = met
        result["all_targets_met"] = all(met.values())
        print(json.dumps(result))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
