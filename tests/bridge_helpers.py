"""A site mosquitto bridged to a central one, with an uplink that a test can cut and restore.

The uplink is a loopback TCP relay between the site's bridge and central: cutting it closes
the listener and every relayed connection (the bridge sees its connection drop and its
reconnects refused) while both brokers keep running, so a test can publish on central and
serve agents on the site during the cut. Stopping central instead would also stop publishing;
restarting the site would also drop its agents. The relay counts the bytes it carries, a
second measure beside central's ``$SYS/broker/bytes/sent``."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.agent_helpers import TIME_SCALE, Broker, free_port

P = "edgefleet/v1"


def site_topics(groups: list[str], devices: list[str]) -> list[str]:
    """The bridge's ``topic`` lines for one site (docs/fleet.md, "Bridged sites"): device
    output goes up; the trust document, the site's group and device deployments, its devices'
    commands and the artifact store come down."""
    up = [f"{P}/devices/+/{leaf} out 1" for leaf in ("state", "events", "telemetry", "cmd/result")]
    down = [f"{P}/trust in 1", f"{P}/artifacts/# in 1"]
    down += [f"{P}/groups/{g}/deployment in 1" for g in groups]
    down += [f"{P}/devices/{d}/{leaf} in 1" for d in devices for leaf in ("deployment", "cmd")]
    return up + down


class Uplink:
    """A TCP relay on a loopback port to ``target``; ``cut()`` drops it, ``restore()`` reopens it."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.bytes_down = 0  # central -> site
        self.bytes_up = 0
        self.connections = 0  # accepted since creation (each bridge (re)connect is one)
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def restore(self) -> None:
        """Listen again (same port); the bridge connects on its next ``restart_timeout``."""
        if self._listener is not None:
            return
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(8)
        self._listener = ls
        t = threading.Thread(target=self._accept, args=(ls,), daemon=True)
        t.start()
        self._threads.append(t)

    start = restore

    def cut(self) -> None:
        """Close the listener and every relayed connection; waits (bounded) for the relay threads."""
        ls, self._listener = self._listener, None
        if ls is not None:
            # shutdown wakes the thread blocked in accept(); close alone leaves it listening
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        threads, self._threads = self._threads, []
        for t in threads:
            t.join(5)

    stop = cut

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                a, _ = ls.accept()
            except OSError:
                return  # cut
            try:
                b = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                a.close()  # central is down: the bridge sees a dropped connection and retries
                continue
            b.settimeout(None)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._listener is not ls:
                    a.close()
                    b.close()
                    return
                self._socks += [a, b]
                self.connections += 1
            for src, dst, down in ((a, b, False), (b, a, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, down), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
        except OSError:
            pass
        for s in (src, dst):  # one side closed: close both, as a dropped link would
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class SiteBroker(Broker):
    """A mosquitto with its own listener and persistence, bridged (``connection central``) to
    ``central_port`` (the Uplink's port, so the link can be cut) with ``topics`` lines."""

    def __init__(
        self,
        directory: Path,
        central_port: int,
        topics: list[str],
        cleansession: bool = True,
        local_cleansession: bool = False,
        restart_timeout: int = 1,
    ) -> None:
        super().__init__(directory)
        bridge = [
            "connection central",
            f"address 127.0.0.1:{central_port}",
            *[f"topic {t}" for t in topics],
            f"cleansession {'true' if cleansession else 'false'}",
            # the site keeps queueing device output for the bridge while the uplink is down
            f"local_cleansession {'true' if local_cleansession else 'false'}",
            f"restart_timeout {restart_timeout}",
            "try_private true",
            f"remote_clientid site-{directory.name}",
            "notifications true",
        ]
        self.conf.write_text(self.conf.read_text() + "\n".join(bridge) + "\n")


class Central(Broker):
    """The central broker, publishing ``$SYS`` every second (``$SYS/broker/bytes/sent``)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.conf.write_text(self.conf.read_text() + "sys_interval 1\n")


def retained(url: str, topic: str, limit: float = 2.0) -> bytes | None:
    """The retained payload on ``topic`` at broker ``url`` (None: none within ``limit`` s)."""
    from fleet.mqtt import SyncClient, broker_config

    with SyncClient(broker_config(url)) as c:
        return c.retained_one(topic, limit=limit)


def bridge_up(site: SiteBroker) -> bool:
    """The site bridge's notification (retained on the site): b"1" while connected to central."""
    return retained(site.url, f"$SYS/broker/connection/site-{site.dir.name}/state", 1.0) == b"1"


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` every 0.1 s until true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout * TIME_SCALE
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout * TIME_SCALE:.0f}s")
        time.sleep(0.1)
