"""The agent knows its device: ONNX IR/opset vs the installed onnxruntime, architecture vs the
profile, and the machine/Python/runtime versions in check-config, status and the birth message."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import pytest

import agent.device
from agent.cli import main
from agent.config import load_config
from agent.deploy.agent import Agent
from agent.deploy.policy import resolve_policy
from agent.device import arch_problem, machine
from agent.errors import ConfigError
from agent.protocol import topics
from agent.protocol.messages import StateMessage, decode, encode
from agent.runtime.onnx_versions import read_versions, too_new
from agent.transport.fake import FakeTransport
from tests.agent_helpers import (
    make_artifact,
    make_keys,
    make_onnx,
    sealed_for,
    write_config,
)

pytest.importorskip("onnx", reason="the test models are written with the onnx package")

ROOT = Path(__file__).resolve().parents[3]
IR_ERROR = (
    "[ONNXRuntimeError] : 1 : FAIL : model.cc:256 onnxruntime::Model::Model(...) "
    "Unsupported model IR version: 10, max supported IR version: 9"
)


def test_read_versions_without_onnx(tmp_path: Path) -> None:
    make_onnx(tmp_path / "m.onnx", seed=0)
    v = read_versions(tmp_path / "m.onnx")
    assert (v.ir_version, v.opsets) == (8, {"ai.onnx": 17})
    assert v.describe() == "ONNX IR 8, opset ai.onnx 17"
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError):
        read_versions(tmp_path / "junk.onnx")


def test_too_new_names_both_versions(tmp_path: Path) -> None:
    make_onnx(tmp_path / "model.onnx", seed=0)
    reason = too_new(tmp_path / "model.onnx", "1.17.3", IR_ERROR)
    assert reason is not None and "\n" not in reason
    assert (
        "ONNX IR 8, opset ai.onnx 17" in reason and "onnxruntime 1.17.3 loads up to IR 9" in reason
    )
    opset_err = (
        "Opset 23 is under development and support for this is limited. "
        "Current official support for domain ai.onnx is till opset 21."
    )
    assert "supports ai.onnx up to opset 21" in (
        too_new(tmp_path / "model.onnx", "1.18.0", opset_err) or ""
    )
    assert too_new(tmp_path / "model.onnx", "1.18.0", "some other failure") is None


def _agent(tmp: Path, **cfg: Any) -> tuple[Agent, FakeTransport, Any]:
    keys = make_keys(tmp / "keys")
    cfg_path = write_config(
        tmp / "agent.toml",
        "dev",
        "mqtt://127.0.0.1:1",
        [keys.public],
        tmp / "state",
        probation_s=0.0,
        **cfg,
    )
    conf = load_config(cfg_path)
    fake = FakeTransport()
    agent = Agent(conf, resolve_policy(conf), fake)
    agent.start()
    return agent, fake, keys


def test_model_newer_than_runtime_is_rejected_with_both_versions(tmp_path: Path) -> None:
    import onnxruntime

    agent, fake, keys = _agent(tmp_path)
    from fleet.publish import announcement

    art = make_artifact(tmp_path, keys, ir_version=99)
    ann = announcement(art, 1 << 20)
    fake.retained[topics.artifact_chunk(ann.sha256, 0)] = art.read_bytes()
    fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(
            fake.retained[topics.artifact_manifest(ann.sha256)], "tiny", "1.0.0", device="dev"
        ),
        retain=True,
    )
    agent.drain()
    events = [json.loads(p) for t, p, _ in fake.published if t.endswith("/events")]
    final = [e for e in events if e["state"] in ("REJECTED", "ROLLED_BACK", "ACTIVE")]
    assert [e["state"] for e in final] == ["REJECTED"], final
    reason = final[0]["reason"]
    assert (
        "ONNX IR 99" in reason
        and f"onnxruntime {onnxruntime.__version__}" in reason
        and "\n" not in reason
    )
    assert agent.active is None and not list((tmp_path / "state" / "versions").glob("*"))


def test_birth_message_reports_the_device(tmp_path: Path) -> None:
    agent, fake, _ = _agent(tmp_path)
    agent.out.publish_state(online=True)
    state = [p for t, p, _ in fake.published if t == topics.device_topic("dev", "state")][-1]
    info = decode(StateMessage, state).device_info
    assert (
        info is not None and info.machine == machine() and info.python == platform.python_version()
    )
    assert info.runtimes["onnxruntime"].split()[-1] == __import__("onnxruntime").__version__
    # a state message from an agent without the device report still decodes
    old = StateMessage(device="d", online=True, agent_version="0", profile="p", seq=1, ts=1.0)
    assert decode(StateMessage, encode(old)).device_info is None


def _other_arch_config(tmp_path: Path, check: str) -> Path:
    other = "x86-ipc" if machine() != "x86_64" else "rpi4"
    keys = make_keys(tmp_path / "k")
    path = write_config(
        tmp_path / "agent.toml",
        "dev-1",
        "mqtt://127.0.0.1:1883",
        [keys.public],
        tmp_path / "state",
        profile=other,
        runtimes=("onnxruntime",),
    )
    text = path.read_text().replace(
        'log_level = "debug"',
        f'log_level = "debug"\nprofiles_dir = "{ROOT / "device_profiles"}"\narch_check = "{check}"',
    )
    path.write_text(text)
    return path


def test_arch_mismatch_warns_by_default_and_refuses_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert arch_problem("p", machine()) is None
    assert "is for sparc" in (arch_problem("p", "sparc") or "")
    warn = _other_arch_config(tmp_path, "warn")
    policy = resolve_policy(load_config(warn))
    assert len(policy.warnings) == 1 and f"this machine is {machine()}" in policy.warnings[0]
    assert main(["check-config", str(warn)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: profile" in out and "OK" in out
    refuse = _other_arch_config(tmp_path, "refuse")
    with pytest.raises(ConfigError, match=r"hardware\.arch"):
        resolve_policy(load_config(refuse))
    assert main(["check-config", str(refuse)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hardware.arch" in err


def test_check_config_names_runtimes_found_and_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _other_arch_config(tmp_path, "warn")
    assert main(["check-config", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runtimes_found"]["onnxruntime"].endswith(__import__("onnxruntime").__version__)
    assert (
        doc["profile_runtime"] in ("onnxruntime", "litert")
        and doc["device"]["machine"] == machine()
    )
    assert main(["check-config", str(cfg)]) == 0
    assert "runtimes found: " in capsys.readouterr().out
    # the accepted runtime is missing: exit 7 naming the extra to install
    monkeypatch.setitem(agent.device._RUNTIME_DISTS, "onnxruntime", ("no-such-distribution",))
    assert main(["check-config", str(cfg)]) == 7
    err = capsys.readouterr().err
    assert (
        "runtime onnxruntime is not installed here" in err and "edgefleet[agent,onnxruntime]" in err
    )


def test_status_reports_the_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    assert main(["status", "--state-dir", str(tmp_path / "state")]) == 0
    assert capsys.readouterr().out.startswith(
        f"device: {machine()}, Python {platform.python_version()}"
    )
    assert main(["status", "--state-dir", str(tmp_path / "state"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"]["machine"] == machine()
