"""Shared helpers for agent tests: tiny ONNX artifacts, a real mosquitto broker, agent processes,
and an MQTT listener that waits (bounded) for events."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
from agent.protocol.signing import generate_keypair, load_private_key
from fleet.localfleet import free_port as free_port  # one helper, re-exported

REPO = Path(__file__).resolve().parents[1]
# Time limits in tests scale with the machine: 1 on a workstation; more on a slow or loaded runner
# or under emulation (.ci/arm64 sets EDGEFLEET_TEST_TIME_SCALE for qemu). Waits are on conditions;
# this only moves the point where a wait gives up or a timing bound is judged.
TIME_SCALE = max(1.0, float(os.environ.get("EDGEFLEET_TEST_TIME_SCALE", "1") or 1))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# ------------------------------------------------------------------------------ artifacts


def make_onnx(
    path: Path, seed: int, n_in: int = 64, n_out: int = 10, extra_params: int = 0
) -> None:
    """MatMul + Add (n_in -> n_out); ``extra_params`` float32 zeros added to the bias path make it big."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32) / 8
    b = rng.standard_normal(n_out).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if extra_params:
        # A large initializer that only feeds a ReduceSum multiplied by 0: the model grows, outputs do not.
        pad = rng.standard_normal(extra_params).astype(np.float32)
        inits += [
            numpy_helper.from_array(pad, "P"),
            numpy_helper.from_array(np.zeros(1, np.float32), "Z"),
        ]
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["h0"]),
            helper.make_node("ReduceSum", ["P"], ["s"], keepdims=1),
            helper.make_node("Mul", ["s", "Z"], ["sz"]),
            helper.make_node("Add", ["h0", "sz"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["y"], {"x": x})[0])


@dataclass
class Keys:
    private: Path
    public: Path


def make_keys(directory: Path, name: str = "test") -> Keys:
    """A release key pair (signs artifacts); agents trust it through ``trust_for``."""
    priv, pub = generate_keypair(directory, name, force=True)
    return Keys(priv, pub)


# ------------------------------------------------------------------------------ trust

_TEST_ROOT: Path | None = None


def trust_root() -> Path:
    """One root and operator key pair for the whole test process (root.key/.pub, operator.key/
    .pub); every agent a test starts pins this root. Created on first use, removed at exit."""
    global _TEST_ROOT
    if _TEST_ROOT is None:
        import atexit
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="edgefleet-test-root-"))
        atexit.register(shutil.rmtree, d, True)
        generate_keypair(d, "root", force=True)
        generate_keypair(d, "operator", force=True)
        _TEST_ROOT = d
    return _TEST_ROOT


def trust_for(release_pubs: list[Path], directory: Path, version: int = 2) -> Path:
    """A trust document signed by the test root that lists ``release_pubs`` and the test
    operator key; written to DIRECTORY/trust.json."""
    from fleet.trust import new_document

    root = trust_root()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trust.json"
    roles = {"release": release_pubs, "operator": [root / "operator.pub"]}
    new_document(path, root / "root.key", roles, version)
    return path


def operator() -> Any:
    """The test operator: signs deployments and commands every test agent accepts."""
    from fleet.trust import Operator

    return Operator(trust_root() / "operator.key")


def sealed_deployment(device: str | None, dep: Any, group: str | None = None) -> bytes:
    from agent.protocol.trust import Target

    return operator().deployment(
        Target(device=device, group=group), dep.model_dump(mode="json", exclude_none=True)
    )


def sealed_for(
    announcement: bytes,
    name: str,
    version: str,
    device: str | None = None,
    group: str | None = None,
    deployed_at: str = "",
) -> bytes:
    """A signed deployment of the artifact an announcement payload describes (as the fleet's
    deploy makes it: size and chunk table digest from the announcement)."""
    from agent.protocol.messages import (
        MAX_ANNOUNCEMENT_BYTES,
        ArtifactAnnouncement,
        Deployment,
        decode,
    )

    ann = decode(ArtifactAnnouncement, announcement, MAX_ANNOUNCEMENT_BYTES)
    dep = Deployment(
        name=name,
        version=version,
        sha256=ann.sha256,
        size=ann.size,
        chunks_sha256=ann.table_digest(),
        deployed_at=deployed_at,
    )
    return sealed_deployment(device, dep, group)


def sealed_command(device: str, cmd: Any) -> bytes:
    body = cmd if isinstance(cmd, dict) else cmd.model_dump(mode="json", exclude_none=True)
    return bytes(operator().command(device, body))


def make_artifact(
    out_dir: Path,
    keys: Keys,
    name: str = "tiny",
    version: str = "1.0.0",
    profile: str = "test-cpu",
    runtime: str = "onnxruntime",
    seed: int = 0,
    bad_golden: bool = False,
    extra_params: int = 0,
    ir_version: int | None = None,
    security_floor: str | None = None,
    reference: bool = False,
) -> Path:
    """A signed artifact built with the real manifest/golden/package code. ``ir_version`` restamps
    the model after its golden outputs are computed (a model newer than the installed runtime);
    ``security_floor`` goes in the manifest (no version of NAME below it runs once activated);
    ``reference`` adds a drift reference profile (reference.json, the builder's code) of the
    model on standard-normal inputs."""
    from builder.package import file_entry, write_artifact
    from builder.reference import REFERENCE_FILE, build_reference, encode_reference

    work = out_dir / f"work-{name}-{version}-{profile}-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    make_onnx(model, seed, extra_params=extra_params)
    x = np.random.default_rng(seed + 100).standard_normal((8, 64)).astype(np.float32)
    y = _run_onnx(model, x)
    exp = y + 5.0 if bad_golden else y
    golden = work / "golden.npz"
    GoldenSet({"x": x}, {"y": y}, {"y": exp}).save(golden)
    files = {"model.onnx": model, "golden.npz": golden}
    if reference:
        rx = np.random.default_rng(seed + 200).standard_normal((2000, 64)).astype(np.float32)
        ref = build_reference({"x": rx}, {"y": _run_onnx(model, rx)}, "classification")
        files[REFERENCE_FILE] = work / REFERENCE_FILE
        files[REFERENCE_FILE].write_bytes(encode_reference(ref))
    if ir_version is not None:
        import onnx

        proto = onnx.load(str(model))
        proto.ir_version = ir_version
        onnx.save(proto, str(model))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        profile=profile,
        runtime=runtime,  # type: ignore[arg-type]
        precision="fp32",
        task="classification",
        created="2026-01-01T00:00:00Z",
        builder_version="test",
        model=ModelInfo(
            file="model.onnx",
            inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 64])],
            outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 10])],
        ),
        files={k: file_entry(p) for k, p in files.items()},
        metrics={},
        recipe=Recipe(name="test", steps=[]),
        golden=Golden(file="golden.npz", count=8, atol=1e-4, rtol=1e-4, min_top1_agreement=0.9),
        security_floor=security_floor,
        monitor=MonitorRef(file=REFERENCE_FILE) if reference else None,
    )
    out = (
        out_dir
        / f"{name}-{version}-{profile}-{seed}{'-bad' if bad_golden else ''}{f'-ir{ir_version}' if ir_version else ''}{f'-floor{security_floor}' if security_floor else ''}{'-ref' if reference else ''}.efa"
    )
    return write_artifact(out, manifest, files, load_private_key(keys.private))


# A model with the inputs real models have: int64 ids and mask with a dynamic sequence axis,
# float16, bool, a scalar and a state tensor whose batch axis is 1; outputs of four dtypes.
MULTI_INPUTS = [
    TensorSpec(name="input_ids", dtype="int64", shape=["batch", "seq"]),
    TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "seq"]),
    TensorSpec(name="scale", dtype="float16", shape=["batch", 4]),
    TensorSpec(name="flag", dtype="bool", shape=["batch"]),
    TensorSpec(name="sr", dtype="int64", shape=[]),
    TensorSpec(name="state", dtype="float32", shape=[2, "batch", 8]),
]
MULTI_OUTPUTS = [
    TensorSpec(name="score", dtype="float32", shape=["batch"]),
    TensorSpec(name="embedding", dtype="float16", shape=["batch", 4]),
    TensorSpec(name="total", dtype="int64", shape=["batch"]),
    TensorSpec(name="best", dtype="int64", shape=["batch"]),
    TensorSpec(name="keep", dtype="bool", shape=["batch"]),
    TensorSpec(name="stateN", dtype="float32", shape=[2, "batch", 8]),
]
MULTI_KEEP_ABOVE = 30  # keep = flag and total > this


def make_multi_onnx(path: Path) -> None:
    """total = sum(ids * mask over seq) + sr; embedding = fp16(total) * scale; best = argmax(scale);
    keep = flag and total > MULTI_KEEP_ABOVE; score = sum(embedding) + sum(state over axes 0, 2);
    stateN = state / 2 + score (broadcast over axes 0 and 2). See ``multi_reference``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    types = {
        "float32": TensorProto.FLOAT,
        "float16": TensorProto.FLOAT16,
        "int64": TensorProto.INT64,
        "bool": TensorProto.BOOL,
    }
    node = helper.make_node
    consts = [
        numpy_helper.from_array(np.array(v, np.int64), n)
        for n, v in (("ax1", [1]), ("ax02", [0, 2]), ("keep_above", MULTI_KEEP_ABOVE))
    ]
    consts.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    nodes = [
        node("Mul", ["input_ids", "attention_mask"], ["masked"]),
        node("ReduceSum", ["masked", "ax1"], ["summed"], keepdims=0),
        node("Add", ["summed", "sr"], ["total"]),
        node("Cast", ["total"], ["total16"], to=TensorProto.FLOAT16),
        node("Unsqueeze", ["total16", "ax1"], ["total16u"]),
        node("Mul", ["total16u", "scale"], ["embedding"]),
        node("ArgMax", ["scale"], ["best"], axis=1, keepdims=0),
        node("Greater", ["total", "keep_above"], ["big"]),
        node("And", ["flag", "big"], ["keep"]),
        node("Cast", ["embedding"], ["emb32"], to=TensorProto.FLOAT),
        node("ReduceSum", ["emb32", "ax1"], ["esum"], keepdims=0),
        node("ReduceSum", ["state", "ax02"], ["ssum"], keepdims=0),
        node("Add", ["esum", "ssum"], ["score"]),
        node("Unsqueeze", ["score", "ax02"], ["score_u"]),
        node("Mul", ["state", "half"], ["state_half"]),
        node("Add", ["state_half", "score_u"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes,
        "multi",
        [helper.make_tensor_value_info(t.name, types[t.dtype], t.shape) for t in MULTI_INPUTS],
        [helper.make_tensor_value_info(t.name, types[t.dtype], t.shape) for t in MULTI_OUTPUTS],
        consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def multi_feeds(
    rng: np.random.Generator, batch: int, seq: int, sr: int | None = None
) -> dict[str, np.ndarray]:
    """Random feeds for the multi-input model (ids 0..19, a mask with trailing padding)."""
    lengths = rng.integers(1, seq + 1, batch)
    return {
        "input_ids": rng.integers(0, 20, (batch, seq)).astype(np.int64),
        "attention_mask": (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64),
        "scale": rng.uniform(0, 1, (batch, 4)).astype(np.float16),
        "flag": rng.integers(0, 2, batch).astype(bool),
        "sr": np.array(int(rng.integers(0, 6)) if sr is None else sr, np.int64),
        "state": rng.standard_normal((2, batch, 8)).astype(np.float32),
    }


def multi_reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the multi-input model computes, in numpy (float16 steps as onnxruntime rounds them)."""
    total = (feeds["input_ids"] * feeds["attention_mask"]).sum(1) + feeds["sr"]
    emb = total.astype(np.float16)[:, None] * feeds["scale"]
    score = emb.astype(np.float32).sum(1) + feeds["state"].sum((0, 2))
    return {
        "score": score,
        "embedding": emb,
        "total": total,
        "best": feeds["scale"].argmax(1),
        "keep": feeds["flag"] & (total > MULTI_KEEP_ABOVE),
        "stateN": feeds["state"] * np.float32(0.5) + score[None, :, None],
    }


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of an ONNX model run directly in onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {n: np.asarray(v) for n, v in zip(names, sess.run(names, feeds), strict=True)}


def multi_golden(model: Path, cases: int = 3, seed: int = 0) -> GoldenSet:
    """Per-case golden vectors: batch 1 each, its own sequence length and scalar ``sr``."""
    from agent.protocol.golden import GoldenCase

    rng = np.random.default_rng(seed)
    out = []
    for k in range(cases):
        feeds = multi_feeds(rng, 1, 2 + 3 * k)
        ref = run_onnx(model, feeds)
        out.append(GoldenCase(feeds, ref, {n: v.copy() for n, v in ref.items()}))
    return GoldenSet.of_cases(out)


def make_multi_artifact(
    out_dir: Path,
    keys: Keys,
    name: str = "multi",
    version: str = "1.0.0",
    profile: str = "test-cpu",
    cases: int = 3,
    corrupt: str | None = None,
) -> Path:
    """A signed artifact of the multi-input model; ``corrupt``: an output whose expected golden
    values are off by one (an exact-match failure for an integer output)."""
    from builder.package import file_entry, write_artifact

    work = out_dir / f"work-{name}-{version}-{profile}-{corrupt}"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    make_multi_onnx(model)
    golden_set = multi_golden(model, cases)
    if corrupt is not None:
        for case in golden_set.cases:
            v = case.expected[corrupt]
            case.expected[corrupt] = ~v if v.dtype == np.bool_ else v + np.ones((), v.dtype)
    golden = work / "golden.npz"
    golden_set.save(golden)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        profile=profile,
        runtime="onnxruntime",
        precision="fp32",
        task="regression",
        created="2026-01-01T00:00:00Z",
        builder_version="test",
        model=ModelInfo(file="model.onnx", inputs=MULTI_INPUTS, outputs=MULTI_OUTPUTS),
        files={"model.onnx": file_entry(model), "golden.npz": file_entry(golden)},
        metrics={},
        recipe=Recipe(name="test", steps=[]),
        golden=Golden(file="golden.npz", count=cases, atol=1e-3, rtol=1e-3),
    )
    out = out_dir / f"{name}-{version}-{profile}{'-' + corrupt if corrupt else ''}.efa"
    return write_artifact(
        out, manifest, {"model.onnx": model, "golden.npz": golden}, load_private_key(keys.private)
    )


# ------------------------------------------------------------------------------ broker


def stop_process(
    p: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int | None:
    """Send ``sig`` and wait for the exit code; a process still running after ``timeout`` s is
    killed (so a test never leaves it behind) and None is returned for the test to assert on."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        return p.wait(timeout * TIME_SCALE)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
        return None


class Broker:
    """A real mosquitto on a loopback port, with persistence so retained messages survive restarts."""

    def __init__(self, directory: Path, port: int | None = None, max_queued: int = 10000) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            f"max_queued_messages {max_queued}\n" + ("user root\n" if os.geteuid() == 0 else "")
            # as root, mosquitto drops to user 'mosquitto', which cannot write its db here
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        timeout *= TIME_SCALE
        log = (self.dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-500:]}"
                    ) from None
                time.sleep(0.05)
        self.stop()  # a test whose broker never listened does not leave it running
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(
                self.proc, signal.SIGTERM, 10
            )  # SIGTERM: mosquitto saves its persistence db
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


# ------------------------------------------------------------------------------ listener


class Listener:
    """Collects every message under edgefleet/v1/devices/# (and extra topics) for assertions."""

    def __init__(self, url: str, patterns: tuple[str, ...] = ("edgefleet/v1/devices/#",)) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, bytes]] = []
        self._cv = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.c.reconnect_delay_set(1, 2)

        def on_connect(client: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            if not rc.is_failure:
                client.subscribe([(t, 1) for t in patterns])

        def on_message(client: Any, u: Any, msg: Any) -> None:
            with self._cv:
                self.messages.append((msg.topic, bytes(msg.payload)))
                self._cv.notify_all()

        self.c.on_connect = on_connect
        self.c.on_message = on_message
        self.c.connect_async(host, int(port))
        self.c.loop_start()

    def events(self, device: str) -> list[dict[str, Any]]:
        with self._cv:
            msgs = list(self.messages)
        out = []
        for t, p in msgs:
            if t == f"edgefleet/v1/devices/{device}/events":
                out.append(json.loads(p))
        return out

    def wait_event(
        self, device: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events(device):
                if pred(ev):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no matching event for {device} within {timeout}s; got: "
                    + json.dumps(
                        [(e["kind"], e.get("state"), e.get("reason")) for e in self.events(device)]
                    )[-3000:]
                )
            with self._cv:
                self._cv.wait(min(left, 0.2))

    def wait_state(
        self, device: str, state: str, sha: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        return self.wait_event(
            device,
            lambda e: e.get("state") == state and (sha is None or e.get("sha256") == sha),
            timeout,
        )

    def wait_message(
        self, topic: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                for t, p in self.messages:
                    if t == topic:
                        doc = json.loads(p)
                        if pred(doc):
                            return dict(doc)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message on {topic} within {timeout}s")
                self._cv.wait(min(left, 0.2))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# ------------------------------------------------------------------------------ agent process


def write_config(
    path: Path,
    device: str,
    broker_url: str,
    keys: list[Path],
    state_dir: Path,
    profile: str = "test-cpu",
    groups: tuple[str, ...] = (),
    protocol: str = "3.1.1",
    runtimes: tuple[str, ...] = ("onnxruntime",),
    serve: dict[str, Any] | None = None,
    telemetry: dict[str, Any] | None = None,
    keep_versions: int = 1,
    transfer: dict[str, Any] | None = None,
    commands: dict[str, Any] | None = None,
    monitor: dict[str, Any] | None = None,
    capture: dict[str, Any] | None = None,
    **install: Any,
) -> Path:
    """``serve``: the [serve] section; default disabled, so agents in one test do not share a port.
    ``telemetry``, ``commands``, ``monitor``: those sections (default: the agent's defaults); ``transfer``:
    keys added to (or replacing) [transfer]'s window = 8 and stall_s = 5."""
    xfer = {"window": 8, "stall_s": 5.0, **(transfer or {})}
    inst = {
        "bench_runs": 10,
        "max_p95_ms": 1000.0,
        "max_p95_regression_pct": 500.0,
        "probation_s": 1.0,
        "probation_interval_s": 0.3,
        **install,
    }
    lines = [
        f'device_id = "{device}"',
        f'profile = "{profile}"',
        f"groups = {json.dumps(list(groups))}",
        f'state_dir = "{state_dir}"',
        f'root_key = "{trust_root() / "root.pub"}"',
        f'trust_file = "{trust_for(keys, path.parent / "trust")}"',
        f"keep_versions = {keep_versions}",
        f"runtimes = {json.dumps(list(runtimes))}",
        'log_level = "debug"',
        "[broker]",
        f'url = "{broker_url}"',
        "reconnect_min_s = 1",
        "reconnect_max_s = 2",
        f'protocol = "{protocol}"',
        "[transfer]",
        *[f"{k} = {json.dumps(v)}" for k, v in xfer.items()],
        "[install]",
        *[f"{k} = {json.dumps(v)}" for k, v in inst.items()],
        "[serve]",
        *[f"{k} = {json.dumps(v)}" for k, v in (serve or {"enabled": False}).items()],
        "[telemetry]",
        *[f"{k} = {json.dumps(v)}" for k, v in (telemetry or {}).items()],
        "[commands]",
        *[f"{k} = {json.dumps(v)}" for k, v in (commands or {}).items()],
        "[monitor]",
        *[f"{k} = {json.dumps(v)}" for k, v in (monitor or {}).items()],
        "[capture]",
        *[f"{k} = {json.dumps(v)}" for k, v in (capture or {}).items()],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.log = config, log
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
            cwd=REPO,
            env=self.env,
            stdout=fh,
            stderr=fh,
        )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def publish(broker_url: str, artifact: Path, chunk_size: int = 1024) -> str:
    from fleet.mqtt import broker_config
    from fleet.publish import publish_artifact

    return publish_artifact(
        artifact, broker_config(broker_url), chunk_size=chunk_size, force=True
    ).sha256


def deploy(broker_url: str, spec: str, device: str | None = None, group: str | None = None) -> str:
    from fleet.deploy import deploy as _deploy
    from fleet.mqtt import broker_config

    return _deploy(
        broker_config(broker_url), spec, operator(), device=device, group=group
    ).deployment.sha256


def active_sha(state_dir: Path) -> str | None:
    from agent.store.summary import state_summary

    a = state_summary(state_dir)["active"]
    return None if a is None else str(a["sha256"])


def set_deployment(
    broker_url: str,
    device: str,
    name: str,
    version: str,
    sha: str,
    capture: dict[str, Any] | None = None,
) -> None:
    """Publish a signed retained device deployment of artifact ``sha`` under any name and
    version (bypassing the index lookup; size and chunk table come from its announcement);
    ``capture``: the deployment's [capture] keys."""
    from agent.protocol import topics
    from agent.protocol.messages import (
        MAX_ANNOUNCEMENT_BYTES,
        ArtifactAnnouncement,
        Deployment,
        decode,
    )
    from fleet.mqtt import SyncClient, broker_config

    with SyncClient(broker_config(broker_url)) as c:
        payload = c.retained_one(topics.artifact_manifest(sha), limit=5.0)
        assert payload is not None, f"artifact {sha[:16]} is not published"
        ann = decode(ArtifactAnnouncement, payload, MAX_ANNOUNCEMENT_BYTES)
        dep = Deployment(
            name=name,
            version=version,
            sha256=sha,
            size=ann.size,
            chunks_sha256=ann.table_digest(),
            deployed_at=str(time.time_ns()),
            capture=capture,
        )
        c.publish(
            topics.device_topic(device, "deployment"), sealed_deployment(device, dep), retain=True
        )
        c.flush()


def send(broker_url: str, topic: str, payload: bytes, retain: bool = False) -> None:
    from fleet.mqtt import SyncClient, broker_config

    with SyncClient(broker_config(broker_url)) as c:
        c.publish(topic, payload, retain=retain)
        c.flush()


def rewrite_tar(
    src: Path,
    dst: Path,
    change: Callable[[str, bytes], bytes | None],
    extra: dict[str, bytes] | None = None,
) -> Path:
    """Copy an artifact tar member by member; ``change`` may alter a member's bytes (None drops it)."""
    import io
    import tarfile

    with tarfile.open(src, "r:") as tin, tarfile.open(dst, "w:", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            fh = tin.extractfile(m)
            assert fh is not None
            data = change(m.name, fh.read())
            if data is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def publish_partial(broker_url: str, artifact: Path, chunk_size: int, indices: list[int]) -> str:
    """Announce ``artifact`` but publish only the chunks in ``indices`` (a transfer that stalls)."""
    from agent.protocol import topics
    from agent.protocol.messages import encode
    from fleet.mqtt import SyncClient, broker_config
    from fleet.publish import announcement

    ann = announcement(artifact, chunk_size)
    data = artifact.read_bytes()
    with SyncClient(broker_config(broker_url)) as c:
        for i in indices:
            c.publish(
                topics.artifact_chunk(ann.sha256, i), data[i * chunk_size : (i + 1) * chunk_size]
            )
        c.publish(topics.artifact_manifest(ann.sha256), encode(ann))
        c.flush()
    return ann.sha256


def check_loadable(state_dir: Path) -> str | None:
    """The active version's sha after checking it loads and passes its golden test (None: no active)."""
    from agent.deploy import selftest
    from agent.store.versions import VersionStore

    inst = VersionStore(state_dir, keep=1).active()
    if inst is None:
        return None
    with selftest.load(inst, 1) as sess:
        assert selftest.golden_check(sess, inst, selftest.golden_of(inst)) is None
    return inst.sha256


def retained_figures(broker_url: str, quiet: float = 1.0) -> dict[str, int]:
    """What the broker retains, seen by a fresh subscriber to '#' (messages and payload bytes;
    run it while nothing else publishes), and mosquitto's own `$SYS/broker/retained messages/
    count` (-1 unless the broker publishes $SYS: sys_interval)."""
    from fleet.mqtt import SyncClient, broker_config

    with SyncClient(broker_config(broker_url)) as c:
        li = c.listen([("#", 1)], wait=True)
        n = size = 0
        while (m := li.get(quiet)) is not None:
            if m.payload:
                n += 1
                size += len(m.payload)
        c.unlisten(li)
        sys_count = c.retained_one("$SYS/broker/retained messages/count", limit=2.0)
    return {
        "retained_messages": n,
        "retained_bytes": size,
        "sys_retained_count": int(sys_count) if sys_count else -1,
    }
