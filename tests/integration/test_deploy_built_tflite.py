"""A .tflite artifact made by the builder (litert-torch, full int8 with int8 I/O) deployed end to
end: real build, real broker, real agent process running it with ai-edge-litert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "litert_torch", reason="litert-torch (pip install 'edgefleet[builder]') is not installed"
)

from agent.protocol.profile import load_profile
from agent.protocol.signing import load_private_key
from builder.config import load_build_config
from builder.search import Builder
from tests.agent_helpers import Broker, Keys, Listener, active_sha, deploy, publish
from tests.conftest import ROOT, DigitsProject

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_builder_made_int8_tflite_deploys(
    digits: DigitsProject,
    broker: Broker,
    listener: Listener,
    agents: Any,
    keys: Keys,
    tmp_path: Path,
) -> None:
    src = (
        (ROOT / "device_profiles" / "rpi4.toml")
        .read_text()
        .replace('name = "rpi4"', 'name = "test-cpu"')
    )
    lines = [
        'candidates = ["tflite_int8"]' if ln.startswith("candidates") else ln
        for ln in src.splitlines()
    ]
    (tmp_path / "test-cpu.toml").write_text("\n".join(lines) + "\n")
    builder = Builder(
        load_build_config(digits.config), load_private_key(keys.private), tmp_path / "cache"
    )
    result = builder.build_profile(load_profile(tmp_path / "test-cpu.toml"), tmp_path / "out")
    assert result.artifact is not None and result.chosen is not None, [
        c.summary() for c in result.candidates
    ]
    assert result.chosen.runtime == "litert" and result.chosen.precision == "int8_static"

    sha = publish(broker.url, result.artifact)
    agents.start("pi-1", runtimes=("litert",))
    deploy(broker.url, "digits@1.0.0", device="pi-1")
    for state in ("FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST", "ACTIVE", "HEALTHY"):
        ev = listener.wait_state("pi-1", state, sha, timeout=60)
        assert ev["reason"] == ""
    sd = agents.state_dir("pi-1")
    assert active_sha(sd) == sha and (sd / "active" / "model.tflite").is_file()
