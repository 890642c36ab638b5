"""Commands end to end: a real agent process answers `edgefleet device cmd` through mosquitto —
deploy, status, benchmark (its inferences are not counted as served latency), rollback to a named kept
version and to the previous one, rebirth, and every kind of bad command gets ok:false."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from agent.clikit import main as edgefleet
from agent.protocol import topics
from tests.agent_helpers import (
    REPO,
    Broker,
    Listener,
    active_sha,
    deploy,
    free_port,
    publish,
    sealed_command,
    send,
)

pytestmark = pytest.mark.integration


def _cmd(capsys: pytest.CaptureFixture[str], broker: Broker, *args: str) -> tuple[int, Any, str]:
    """Run `edgefleet device cmd ... --json` in-process: (exit code, parsed answer or None, stderr)."""
    capsys.readouterr()
    rc = edgefleet(["device", "cmd", *args, "--broker", broker.url, "--timeout", "20", "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def _result(listener: Listener, device: str, cmd_id: str) -> dict[str, Any]:
    return listener.wait_message(
        topics.device_topic(device, "cmd/result"), lambda d: d.get("id") == cmd_id, timeout=15
    )


def test_device_commands(
    broker: Broker,
    listener: Listener,
    agents: Any,
    artifacts: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shas = [publish(broker.url, artifacts(version=f"{v}.0.0", seed=v)) for v in (1, 2, 3)]
    agents.start("dev1", keep_versions=2, telemetry={"interval_s": 0.2})
    sd = agents.state_dir("dev1")
    deploy(broker.url, "tiny@1.0.0", device="dev1")
    listener.wait_state("dev1", "HEALTHY", shas[0])
    for v, sha in ((2, shas[1]), (3, shas[2])):  # deploy by command, not retained
        by_sha = ("--sha256", sha) if v == 2 else ()  # else looked up in the published index
        rc, res, _ = _cmd(
            capsys, broker, "dev1", "deploy", "--name", "tiny", "--version", f"{v}.0.0", *by_sha
        )
        assert rc == 0 and res["ok"] is True
        listener.wait_state("dev1", "HEALTHY", sha)
    assert active_sha(sd) == shas[2]

    rc, res, _ = _cmd(capsys, broker, "dev1", "status")
    assert rc == 0 and res["detail"]["active"]["version"] == "3.0.0"
    assert res["detail"]["kept"] == ["tiny@2.0.0", "tiny@1.0.0"]

    # benchmark: percentiles in order; its 25 inferences are not served traffic: telemetry (and
    # so the canary gate) counts none of them, status does
    rc, res, _ = _cmd(capsys, broker, "dev1", "benchmark", "--runs", "25")
    d = res["detail"]
    assert rc == 0 and d["runs"] == 25 and d["model"] == "tiny@3.0.0"
    assert 0 < d["p50_ms"] <= d["p95_ms"] <= d["p99_ms"] <= d["max_ms"]
    assert isinstance(d["thermal"], dict)
    t_topic = topics.device_topic("dev1", "telemetry")
    with listener._cv:
        seen = sum(1 for t, _ in listener.messages if t == t_topic)
    listener.wait_message(t_topic, lambda m: True, timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a few windows after the benchmark
        with listener._cv:
            msgs = [json.loads(p) for t, p in listener.messages if t == t_topic]
        if len(msgs) >= seen + 3:
            break
        time.sleep(0.1)
    assert len(msgs) >= seen + 3 and sum(m["latency"]["count"] for m in msgs) == 0
    rc, res, _ = _cmd(capsys, broker, "dev1", "status")
    assert res["detail"]["benchmarks"]["runs"] == 25

    # rollback to a named kept version, then to the previous activation
    rc, res, _ = _cmd(capsys, broker, "dev1", "rollback", "--version", "1.0.0")
    assert rc == 0 and res["detail"]["active"] == "tiny@1.0.0"
    assert active_sha(sd) == shas[0]
    listener.wait_event(
        "dev1", lambda e: e.get("state") == "ROLLED_BACK" and e["sha256"] == shas[2]
    )
    rc, res, err = _cmd(capsys, broker, "dev1", "rollback", "--version", "9.9.9")
    assert (
        rc == 10
        and res["ok"] is False
        and "not kept on this device (kept: tiny@2.0.0)" in res["reason"]
    )
    assert err.count("\n") == 1 and err.startswith("error: device dev1 refused 'rollback'")
    rc, res, _ = _cmd(capsys, broker, "dev1", "rollback", "--version", "1.0.0")
    assert rc == 10 and "already the active version" in res["reason"]
    rc, res, _ = _cmd(capsys, broker, "dev1", "rollback")
    assert rc == 0 and res["detail"]["active"] == "tiny@2.0.0" and active_sha(sd) == shas[1]

    # rebirth: the retained state is sent again, with a higher seq
    state_topic = topics.device_topic("dev1", "state")
    listener.wait_message(state_topic, lambda s: True)
    with listener._cv:
        seq = max(json.loads(p)["seq"] for t, p in listener.messages if t == state_topic)
    rc, res, _ = _cmd(capsys, broker, "dev1", "rebirth")
    assert rc == 0 and res["ok"] is True
    reborn = listener.wait_message(state_topic, lambda s: s["seq"] > seq, timeout=10)
    assert reborn["online"] is True and reborn["active"]["version"] == "2.0.0"

    # refused here: an unknown op (exit 2, nothing sent); by the device: out-of-range runs, an
    # argument the op does not take
    rc, res, err = _cmd(capsys, broker, "dev1", "reboot")
    assert (
        rc == 2
        and res is None
        and err.strip()
        == ("error: unknown op 'reboot': one of deploy, rollback, benchmark, rebirth, status")
    )
    rc, res, _ = _cmd(capsys, broker, "dev1", "benchmark", "--runs", "5000")
    assert rc == 10 and "runs must be between 1 and 1000" in res["reason"]
    rc, res, _ = _cmd(capsys, broker, "dev1", "status", "--runs", "3")
    assert rc == 10 and res["reason"] == "status does not take runs"

    # malformed commands (signed, so the body is what is wrong): answered when the id can be
    # read, a bad_message event either way; the reason names the field
    cmd_topic = topics.device_topic("dev1", "cmd")
    send(broker.url, cmd_topic, sealed_command("dev1", {"id": "m1", "op": "status", "bogus": 1}))
    assert _result(listener, "dev1", "m1") == {
        "id": "m1",
        "ok": False,
        "reason": "Command: bogus: unknown field",
        "detail": {},
    }
    send(
        broker.url,
        cmd_topic,
        sealed_command("dev1", {"id": "m2", "op": "benchmark", "runs": "many"}),
    )
    assert "runs" in _result(listener, "dev1", "m2")["reason"]
    bad_deploy = {"name": "tiny", "version": "1.0.0", "sha256": "zz", "size": 1}
    send(
        broker.url,
        cmd_topic,
        sealed_command(
            "dev1", {"id": "m3", "op": "deploy", **bad_deploy, "chunks_sha256": "0" * 64}
        ),
    )
    assert _result(listener, "dev1", "m3")["reason"].startswith("invalid deploy command")
    # unsigned: refused with the reason, answered on cmd/result since its id can be read
    send(broker.url, cmd_topic, b'{"id": "m4", "op": "status"}')
    assert "unsigned" in _result(listener, "dev1", "m4")["reason"]
    send(broker.url, cmd_topic, b"\xff not json")
    send(broker.url, cmd_topic, sealed_command("dev1", {"id": 7, "op": "status"}))
    listener.wait_event(
        "dev1", lambda e: e["kind"] == "bad_message" and "not UTF-8 JSON" in e["reason"]
    )
    listener.wait_event(
        "dev1", lambda e: e["kind"] == "bad_message" and "Command: id:" in e["reason"]
    )
    rc, res, _ = _cmd(capsys, broker, "dev1", "status")  # still serving, same model
    assert rc == 0 and res["detail"]["active"]["version"] == "2.0.0"


def test_cli_errors_are_one_line(broker: Broker) -> None:
    """Through the real entry point: a device that never answers, and a broker that is not there."""
    base = [sys.executable, "-m", "agent.clikit", "device", "cmd"]
    p = subprocess.run(
        [*base, "ghost", "status", "--broker", broker.url, "--timeout", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 9 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: device ghost did not answer 'status' within 1s (it has never reported a state on this broker)"
    ]
    p = subprocess.run(
        [*base, "dev1", "status", "--broker", f"mqtt://127.0.0.1:{free_port()}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 8 and len(p.stderr.strip().splitlines()) == 1
    assert "cannot connect" in p.stderr and "tried 3 times" in p.stderr
    p = subprocess.run(
        [*base, "bad/id", "status", "--broker", broker.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        p.returncode == 2
        and p.stderr.startswith("error: invalid device id")
        and "Traceback" not in p.stderr
    )
