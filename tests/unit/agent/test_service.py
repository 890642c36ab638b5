"""sd_notify over a real AF_UNIX datagram socket, the systemd unit (systemd-analyze verify and
security), and `edgefleet-agent install-service`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.service import Notifier, render_unit

REPO = Path(__file__).resolve().parents[3]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"edgefleet-test-{os.getpid()}-{time.monotonic_ns()}"
    s.bind("\0" + name)
    s.settimeout(2)
    yield "@" + name, s
    s.close()


def test_notifier_abstract_socket_and_watchdog_rate(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    addr, s = abstract_socket
    n = Notifier(
        {"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.interval_s == pytest.approx(0.1)
    n.ready("serving tiny 1.0.0")
    assert s.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=serving tiny 1.0.0"]
    n.status("serving tiny 1.0.0")  # unchanged: not sent again
    n.status("fetching tiny 1.1.0 40%")
    assert s.recv(4096) == b"STATUS=fetching tiny 1.1.0 40%"
    pings = 0
    end = time.monotonic() + 0.55
    while time.monotonic() < end:  # a busy main loop: pings only every half interval
        n.watchdog()
    s.setblocking(False)
    try:
        while True:
            assert s.recv(4096) == b"WATCHDOG=1"
            pings += 1
    except BlockingIOError:
        pass
    assert 4 <= pings <= 7
    n.close()


def test_notifier_is_a_no_op_outside_systemd_and_for_another_pid() -> None:
    assert not Notifier({}).send("READY=1")
    assert (
        Notifier(
            {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        ).interval_s
        is None
    )


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


@needs_analyze
@pytest.mark.parametrize("user", [None, "edgefleet"])
def test_unit_verifies_clean_and_rates_ok(tmp_path: Path, user: str | None) -> None:
    shipped = REPO / "systemd" / "edgefleet-agent.service"
    assert shipped.read_text() == render_unit("/usr/bin/env edgefleet-agent"), (
        "regenerate systemd/ from agent/service.py"
    )
    unit = tmp_path / "edgefleet-agent.service"
    unit.write_text(render_unit("/usr/bin/env edgefleet-agent", user=user))
    for path in (shipped, unit):
        v = _analyze("verify", str(path))
        assert v.returncode == 0 and v.stdout.strip() == "" and v.stderr.strip() == "", (
            v.stdout + v.stderr
        )
        sec = _analyze("security", "--offline=true", str(path))
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", sec.stdout)
        assert m is not None, sec.stdout[-500:] + sec.stderr
        assert float(m.group(1)) <= 4.9 and m.group(2) in ("OK", "SAFE"), m.group(0)
    text = shipped.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=edgefleet",
        # a DynamicUser cannot read a root-owned 0640 config: it gets it (and the keys) as
        # credentials, copied by systemd into a directory only the unit can read
        "LoadCredential=agent.toml:/etc/edgefleet/agent.toml",
        "LoadCredential=keys:/etc/edgefleet/keys",
        "ExecStart=/usr/bin/env edgefleet-agent run --config %d/agent.toml",
    ):
        assert line in text
    fixed = render_unit("/usr/bin/env edgefleet-agent", user="edgefleet")
    assert "LoadCredential" not in fixed and "--config /etc/edgefleet/agent.toml" in fixed


@needs_analyze
def test_a_bad_key_is_reported_by_verify(tmp_path: Path) -> None:
    """The check above can fail: verify prints (but exits 0 on) an unknown key."""
    unit = tmp_path / "edgefleet-agent.service"
    unit.write_text(
        render_unit("/usr/bin/env edgefleet-agent").replace(
            "Type=notify", "Type=notify\nWatchDogSecs=3"
        )
    )
    v = _analyze("verify", str(unit))
    assert "WatchDogSecs" in v.stdout + v.stderr


def test_install_service_writes_unit_and_keeps_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exe = shutil.which("edgefleet-agent") or "/usr/bin/env edgefleet-agent"
    assert main(["install-service", "--root", str(tmp_path), "--exec", exe, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    unit, config = Path(res["unit"]), Path(res["config"])
    assert unit == tmp_path / "etc/systemd/system/edgefleet-agent.service" and res["config_written"]
    assert f"ExecStart={exe} run --config %d/agent.toml" in unit.read_text()
    assert 'state_dir = "/var/lib/edgefleet"' in config.read_text()
    assert 'root_key = "keys/root.pub"' in config.read_text()
    assert 'trust_file = "keys/trust.json"' in config.read_text()
    assert (
        Path(res["keys_dir"]) == tmp_path / "etc/edgefleet/keys" and Path(res["keys_dir"]).is_dir()
    )
    config.write_text("# mine\n")
    assert (
        main(["install-service", "--root", str(tmp_path), "--exec", exe, "--user", "edgefleet"])
        == 0
    )
    assert "kept" in capsys.readouterr().out and config.read_text() == "# mine\n"
    assert "User=edgefleet" in unit.read_text() and "DynamicUser" not in unit.read_text()
    assert f"ExecStart={exe} run --config /etc/edgefleet/agent.toml" in unit.read_text()
    assert main(["install-service", "--root", str(tmp_path), "--exec", exe, "--force"]) == 0
    assert config.read_text() != "# mine\n"
    if ANALYZE is not None and Path(exe).is_absolute() and os.access(exe, os.X_OK):
        v = _analyze("verify", str(unit))
        assert v.stdout.strip() == "" and v.stderr.strip() == "", v.stdout + v.stderr
    assert main(["install-service", "--root", str(tmp_path), "--exec", "relative/agent"]) == 2
    assert "absolute path" in capsys.readouterr().err


def test_one_config_loads_in_place_and_from_systemd_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/etc/edgefleet/{agent.toml,keys/*} as written, and as LoadCredential= lays them out in
    $CREDENTIALS_DIRECTORY (agent.toml, keys_NAME): relative key paths resolve in both."""
    from agent.config import load_config
    from fleet.trust import init_root

    etc = tmp_path / "etc"
    init_root(etc / "keys")
    (etc / "keys" / "ca.pem").write_text("ca")
    text = (
        'device_id = "d1"\nprofile = "rpi4"\nstate_dir = "/var/lib/edgefleet"\n'
        'root_key = "keys/root.pub"\ntrust_file = "keys/trust.json"\n'
        '[broker]\nurl = "mqtts://broker.lan:8883"\nca_file = "keys/ca.pem"\n'
    )
    (etc / "agent.toml").write_text(text)
    cfg = load_config(etc / "agent.toml")
    assert cfg.root_key == (etc / "keys" / "root.pub").resolve()
    assert cfg.trust_file == (etc / "keys" / "trust.json").resolve()
    creds = tmp_path / "creds"  # what systemd makes of the unit's two LoadCredential= lines
    creds.mkdir()
    (creds / "agent.toml").write_text(text)
    for f in (etc / "keys").iterdir():
        (creds / f"keys_{f.name}").write_bytes(f.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(creds / "agent.toml")
    assert cfg.root_key == creds.resolve() / "keys_root.pub"
    assert cfg.trust_file == creds.resolve() / "keys_trust.json"
    assert cfg.broker.ca_file == creds.resolve() / "keys_ca.pem"
    assert cfg.state_dir == Path("/var/lib/edgefleet")


def test_agent_pings_watchdog_during_self_test_and_swaps_through_holder(
    tmp_path: Path, abstract_socket: tuple[str, socket.socket]
) -> None:
    """The worker loop is not running here (drain): every WATCHDOG=1 comes from the self-test's tick."""
    import numpy as np

    from agent.config import load_config
    from agent.deploy.agent import Agent
    from agent.deploy.policy import resolve_policy
    from agent.protocol import topics
    from agent.protocol.messages import encode
    from agent.transport.fake import FakeTransport
    from fleet.publish import announcement
    from tests.agent_helpers import (
        make_artifact,
        make_keys,
        sealed_for,
        write_config,
    )

    addr, s = abstract_socket
    keys = make_keys(tmp_path / "keys")
    cfg = load_config(
        write_config(
            tmp_path / "agent.toml",
            "dev",
            "mqtt://127.0.0.1:1",
            [keys.public],
            tmp_path / "state",
            probation_s=0.0,
            bench_runs=400,
        )
    )
    fake = FakeTransport()
    agent = Agent(cfg, resolve_policy(cfg), fake)
    agent.notifier = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "2000"})  # ping every 1 ms
    agent.start()
    assert agent.holder.current is None
    art = make_artifact(tmp_path, keys, version="1.0.0")
    ann = announcement(art, 4096)
    data = art.read_bytes()
    for i in range(len(ann.chunks)):
        fake.retained[topics.artifact_chunk(ann.sha256, i)] = data[i * 4096 : (i + 1) * 4096]
    fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(
            fake.retained[topics.artifact_manifest(ann.sha256)], "tiny", "1.0.0", device="dev"
        ),
        retain=True,
    )
    got: list[str] = []
    done = threading.Event()

    def read() -> None:  # the socket queues only ~10 datagrams: read while the agent works
        s.settimeout(0.05)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                got.extend(s.recv(4096).decode().split("\n"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        agent.drain()
        time.sleep(0.2)
    finally:
        done.set()
        reader.join(5)
    assert got.count("WATCHDOG=1") >= 2, got
    assert (
        "STATUS=self-test tiny 1.0.0 (no model active)" in got
        and "STATUS=serving tiny 1.0.0" in got
    )
    cur = agent.holder.current
    assert cur is not None and (cur.name, cur.version, cur.sha256) == ("tiny", "1.0.0", ann.sha256)
    before = agent.latency.window().count
    assert before == 0  # the self-test's benchmark is not served traffic
    y = agent.infer({"x": np.zeros((2, 64), np.float32)})["y"]
    assert y.shape == (2, 10) and agent.latency.window().count == 1
