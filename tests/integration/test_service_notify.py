"""A real agent process under a NOTIFY_SOCKET the test owns: READY only once the model serves,
WATCHDOG at half of WATCHDOG_USEC, STATUS lines that follow a deployment, STOPPING on SIGTERM."""

from __future__ import annotations

import http.client
import itertools
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_helpers import TIME_SCALE, Broker, Listener, deploy, publish

pytestmark = pytest.mark.integration


class NotifySocket:
    """Collects sd_notify datagrams with their arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(str(path))
        self.s.settimeout(0.2)
        self.msgs: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().split("\n"):
                self.msgs.append((time.monotonic(), line))

    def wait(self, pred: Any, timeout: float = 30.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.msgs):
                if pred(m[1]):
                    return m
            time.sleep(0.02)
        raise AssertionError(
            f"no matching notification within {timeout}s: {[m for _, m in self.msgs][-20:]}"
        )

    def lines(self) -> list[str]:
        return [m for _, m in self.msgs]

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.s.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))  # AF_UNIX paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_ready_watchdog_status_with_a_real_agent(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any, short_dir: Path
) -> None:
    sha = publish(broker.url, artifacts(version="1.0.0"))
    sock = short_dir / "infer.sock"
    serve = {"unix_socket": str(sock)}
    ns = NotifySocket(short_dir / "notify1")
    # The watchdog interval scales with the machine (as WatchdogSec= would on a slow device): the
    # agent pings at half of WATCHDOG_USEC, and a gap as long as WATCHDOG_USEC is what systemd kills.
    usec = int(1_000_000 * TIME_SCALE)
    env = {"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": str(usec)}
    try:
        p = agents.start("sd", env=env, serve=serve)
        ns.wait(lambda m: m == "READY=1")
        assert "STATUS=no model active" in ns.lines()
        t0, _ = ns.wait(lambda m: m == "WATCHDOG=1")
        deploy(broker.url, "tiny@1.0.0", device="sd")
        ns.wait(lambda m: m == "STATUS=serving tiny 1.0.0")
        listener.wait_state("sd", "HEALTHY", sha, timeout=30)
        lines = ns.lines()
        assert any(m.startswith("STATUS=fetching tiny 1.0.0") for m in lines), lines
        assert any(m.startswith("STATUS=self-test tiny 1.0.0") for m in lines), lines
        time.sleep(max(0.0, t0 + 2.2 * TIME_SCALE - time.monotonic()))
        pings = [t for t, m in ns.msgs if m == "WATCHDOG=1" and t >= t0]
        assert 4 <= len(pings) <= 8, len(pings)  # every usec/2, even while installing
        assert max(b - a for a, b in itertools.pairwise(pings)) < usec / 1e6
        p.stop()
        assert p.proc.returncode == 0
        assert "STOPPING=1" in ns.lines()
    finally:
        ns.close()

    # restart with the model installed: READY comes only once it is loaded and answers
    ns = NotifySocket(short_dir / "notify2")
    try:
        agents.start("sd", env={"NOTIFY_SOCKET": str(ns.path)})
        ns.wait(lambda m: m == "READY=1")
        assert "STATUS=serving tiny 1.0.0" in ns.lines()
        c = UnixHTTPConnection(str(sock))
        c.request("GET", "/v2/health/ready")
        r = c.getresponse()
        assert (r.status, json.loads(r.read())) == (200, {"ready": True})
        c.request("GET", "/v2/models/tiny")
        r = c.getresponse()
        assert json.loads(r.read())["versions"] == ["1.0.0"]
        c.close()
        assert not any(m == "WATCHDOG=1" for m in ns.lines())  # no WATCHDOG_USEC: no pings
    finally:
        agents.stop_all()
        ns.close()
    assert not sock.exists()  # removed on a clean stop
