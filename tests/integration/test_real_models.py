"""Real pretrained models, end to end: built by `edgefleet build`, published to a real mosquitto,
deployed to a real agent process, and called with tritonclient, with int64 inputs, against the
original model run directly in onnxruntime.

* vad: Silero VAD, given as ONNX by the silero-vad wheel: float audio, a recurrent state whose
  batch axis is 1, and an int64 scalar sample rate.
* textenc: all-MiniLM-L6-v2 from its wheel: int64 input_ids and attention_mask [N, 64].
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.agent_helpers import Broker, Listener, deploy, free_port, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str, tmp: Path, profiles: dict[str, str] | None = None) -> Path:
    """The example's data prepared, and its build config copied to ``tmp`` with absolute paths;
    ``profiles`` replaces [profiles.NAME] sections (to keep a test's build short)."""
    pytest.importorskip("torch")
    mod = __import__(f"examples.{name}.prepare", fromlist=["prepare"])
    try:
        mod.prepare()
    except Exception as exc:  # the model wheel is not installed: say so
        pytest.skip(f"examples/{name} cannot be prepared here: {exc}")
    src = ROOT / "examples" / name
    text = (src / "edgefleet.toml").read_text()
    text = re.sub(
        r'"(work/[^"]*|[a-z_]+\.py:[a-z_]+)"', lambda m: json.dumps(str(src / m.group(1))), text
    )
    for p, body in (profiles or {}).items():
        text = re.sub(rf"^\[profiles\.{re.escape(p)}\]\n(?:(?!\[).*\n?)*", "", text, flags=re.M)
        text += f"\n[profiles.{p}]\n{body}\n"
    cfg = tmp / f"{name}.toml"
    cfg.write_text(text)
    return cfg


def _build(cfg: Path, profile: str, tmp: Path) -> dict[str, Any]:
    from builder.cli import main

    out = tmp / "out"
    rc = main(
        [
            "build",
            str(cfg),
            "-p",
            profile,
            "--out",
            str(out),
            "--cache-dir",
            str(ROOT / ".edgefleet-cache"),
            "--json",
            "--profiles-dir",
            str(ROOT / "device_profiles"),
        ]
    )
    assert rc == 0, f"build exited {rc}"
    arts = list(out.glob("*.efa"))
    assert len(arts) == 1
    from agent.protocol.artifact import verify_artifact
    from agent.protocol.signing import load_public_key

    name = arts[0].name.split("-")[0]
    pub = ROOT / "examples" / name / "work" / "keys" / "edgefleet.pub"
    va = verify_artifact(arts[0], [load_public_key(pub)])
    return {"artifact": arts[0], "manifest": va.manifest, "pub": pub}


def _serve(
    agents: Any, listener: Listener, broker: Broker, built: dict[str, Any], device: str
) -> tuple[Any, int]:
    import tritonclient.http as th

    port = free_port()
    m = built["manifest"]
    sha = publish(broker.url, built["artifact"], chunk_size=256 * 1024)
    agents.start(
        device,
        keys=[built["pub"]],
        profile=m.profile,
        serve={"port": port, "max_body_bytes": 8 << 20},
        max_p95_ms=5000.0,
    )
    deploy(broker.url, f"{m.name}@{m.version}", device=device)
    listener.wait_state(device, "ACTIVE", sha, timeout=180)
    client = th.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    return client, port


def _monitored(listener: Listener, device: str, built: dict[str, Any]) -> dict[str, Any]:
    """The device's first telemetry monitor block: drift scores (PSI) of every input and output
    against the reference profile the builder put in the artifact."""
    m = built["manifest"]
    assert m.monitor is not None  # the builder profiled this real model's inputs and outputs
    ins = {s.name for s in m.model.inputs}
    outs = {s.name for s in m.model.outputs}

    def has(doc: dict[str, Any]) -> bool:
        drift = (doc.get("monitor") or {}).get("drift") or {}
        return set(drift.get("inputs", {})) == ins and set(drift.get("outputs", {})) == outs

    doc = listener.wait_message(f"edgefleet/v1/devices/{device}/telemetry", has, timeout=30)
    block: dict[str, Any] = doc["monitor"]
    scores = [*block["drift"]["inputs"].values(), *block["drift"]["outputs"].values()]
    assert block["count"] > 0 and all(np.isfinite(v) and v >= 0 for v in scores), block
    assert block["non_finite"] == 0, block
    return block


def test_vad_stateful_int64_scalar_through_agent_and_tritonclient(
    broker: Broker, listener: Listener, agents: Any, tmp_path: Path
) -> None:
    import onnxruntime as ort
    import tritonclient.http as th

    cfg = _example("vad", tmp_path)
    built = _build(cfg, "generic-cpu", tmp_path)
    m = built["manifest"]
    assert [(s.name, s.dtype) for s in m.model.inputs] == [
        ("input", "float32"),
        ("state", "float32"),
        ("sr", "int64"),
    ]
    assert m.metrics["cosine_min"] >= m.budgets["min_cosine"]
    client, _ = _serve(agents, listener, broker, built, "vad1")
    meta = client.get_model_metadata("vad")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "input": "FP32",
        "state": "FP32",
        "sr": "INT64",
    }

    with np.load(ROOT / "examples" / "vad" / "work" / "eval.npz") as z:
        audio, state = z["input"][:40], z["state"][:40]
    original = ort.InferenceSession(str(ROOT / "examples" / "vad" / "work" / "silero_vad.onnx"))
    for i in range(0, 40, 7):
        feeds = {
            "input": audio[i : i + 1],
            "state": np.ascontiguousarray(state[i][:, None, :]),
            "sr": np.array(16000, dtype=np.int64),
        }
        want = dict(
            zip(["output", "stateN"], original.run(["output", "stateN"], feeds), strict=True)
        )
        for binary in (True, False):
            ins = []
            for name, v in feeds.items():
                dt = "INT64" if v.dtype == np.int64 else "FP32"
                t = th.InferInput(name, list(v.shape), dt)
                t.set_data_from_numpy(v, binary_data=binary)
                ins.append(t)
            res = client.infer("vad", ins)
            np.testing.assert_allclose(res.as_numpy("output"), want["output"], atol=1e-4)
            np.testing.assert_allclose(res.as_numpy("stateN"), want["stateN"], atol=1e-4)
    client.close()
    _monitored(listener, "vad1", built)


def test_transformer_int64_tokens_through_agent_and_tritonclient(
    broker: Broker, listener: Listener, agents: Any, tmp_path: Path
) -> None:
    import torch
    import tritonclient.http as th

    from builder.passes.load import resolve_factory

    # x86-ipc's own int8 candidates for this model, with room for a loaded CI machine's p95.
    cfg = _example(
        "textenc",
        tmp_path,
        {
            "x86-ipc": "budgets = { max_artifact_kb = 40000, max_p95_ms = 2000 }\n"
            'candidates = ["int8_dynamic_pc"]'
        },
    )
    built = _build(cfg, "x86-ipc", tmp_path)
    m = built["manifest"]
    assert [(s.name, s.dtype) for s in m.model.inputs] == [
        ("input_ids", "int64"),
        ("attention_mask", "int64"),
    ]
    assert m.precision.startswith("int8") and m.metrics["cosine_min"] >= 0.98
    client, _ = _serve(agents, listener, broker, built, "tx1")

    # The original model: the pretrained encoder in torch, as the example's factory makes it.
    original = resolve_factory("model.py:build", ROOT / "examples" / "textenc")().eval()
    with np.load(ROOT / "examples" / "textenc" / "work" / "eval.npz") as z:
        ids, mask = z["input_ids"][:6], z["attention_mask"][:6]
    with torch.no_grad():
        want = original(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    for binary in (True, False):
        ins = []
        for name, v in (("input_ids", ids), ("attention_mask", mask)):
            t = th.InferInput(name, list(v.shape), "INT64")
            t.set_data_from_numpy(v, binary_data=binary)
            ins.append(t)
        got = client.infer("textenc", ins).as_numpy("sentence_embedding")
        cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert got.shape == (6, 384) and cos.min() >= 0.98, cos
    client.close()
    _monitored(listener, "tx1", built)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
