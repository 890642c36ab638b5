"""A TFLite (LiteRT) artifact deployed end to end: real broker, real agent process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "ai_edge_litert", reason="LiteRT (pip install 'edgefleet[tflite]') is not installed"
)

from agent.protocol.golden import GoldenSet
from agent.protocol.manifest import (
    FORMAT_VERSION,
    Golden,
    Manifest,
    ModelInfo,
    Quantization,
    Recipe,
    TensorSpec,
)
from agent.protocol.signing import load_private_key
from agent.runtime import load_session
from builder.package import file_entry, write_artifact
from tests.agent_helpers import Broker, Keys, Listener, active_sha, deploy, publish
from tests.fixtures.tflite_build import fc_model

pytestmark = pytest.mark.integration


def tflite_artifact(out: Path, keys: Keys, int8: bool) -> Path:
    m = fc_model(int8=int8)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model.tflite"
    model.write_bytes(m.tflite)
    x = np.random.default_rng(3).uniform(-1, 1, (8, 4)).astype(np.float32)
    with load_session("litert", model) as s:
        expected = s.infer({"input": x})["output"]
    golden = out / "golden.npz"
    GoldenSet({"input": x}, {"output": m.reference(x)}, {"output": expected}).save(golden)
    dtype = "int8" if int8 else "float32"
    qin = Quantization(scale=m.in_scale, zero_point=m.in_zp) if int8 else None
    qout = Quantization(scale=m.out_scale, zero_point=m.out_zp) if int8 else None
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name="fc",
        version="1.0.0",
        profile="test-cpu",
        runtime="litert",
        precision="int8_static" if int8 else "fp32",
        task="regression",
        created="2026-01-01T00:00:00Z",
        builder_version="test",
        model=ModelInfo(
            file="model.tflite",
            inputs=[TensorSpec(name="input", dtype=dtype, shape=["batch", 4], quantization=qin)],
            outputs=[TensorSpec(name="output", dtype=dtype, shape=["batch", 3], quantization=qout)],
        ),
        files={"model.tflite": file_entry(model), "golden.npz": file_entry(golden)},
        metrics={},
        recipe=Recipe(name="handmade", steps=[]),
        golden=Golden(file="golden.npz", count=8, atol=max(m.out_scale, 1e-5), rtol=0.0),
    )
    return write_artifact(
        out / f"fc-{dtype}.efa",
        manifest,
        {"model.tflite": model, "golden.npz": golden},
        load_private_key(keys.private),
    )


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_tflite_artifact_deploys(
    broker: Broker, listener: Listener, agents: Any, keys: Keys, tmp_path: Path, int8: bool
) -> None:
    art = tflite_artifact(tmp_path / "art", keys, int8)
    sha = publish(broker.url, art)
    device = f"lite-{'q' if int8 else 'f'}"
    agents.start(device, runtimes=("litert",))
    deploy(broker.url, "fc@1.0.0", device=device)
    for state in ("FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST", "ACTIVE", "HEALTHY"):
        ev = listener.wait_state(device, state, sha, timeout=45)
        assert ev["reason"] == ""
    sd = agents.state_dir(device)
    assert active_sha(sd) == sha
    assert (sd / "active" / "model.tflite").read_bytes() == fc_model(int8=int8).tflite
