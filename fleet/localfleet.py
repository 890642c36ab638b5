"""Processes for a fleet on one machine (the demo): a broker and children in their own process groups.

Every child is started in a new session, so one killpg ends it and whatever it spawned; on Linux
it also gets SIGTERM if the parent dies without cleaning up (PR_SET_PDEATHSIG), even on SIGKILL.
The broker is mosquitto when installed, else amqtt (pure Python, MQTT 3.1.1) in its own process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.errors import EdgefleetError, UsageError, missing_dependency

REPO = Path(__file__).resolve().parents[1]


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the demo dies without cleaning up (even SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Procs:
    """Processes started by the demo, each in its own process group; stop_all ends every one."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        p = subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
            start_new_session=True,
            preexec_fn=_pdeathsig if sys.platform == "linux" else None,
        )
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # anything left in the group (it leads its own group)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):  # agents and collector first, the broker last
            self.stop(p)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, p: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        if p.poll() is not None:
            raise EdgefleetError(f"{what} exited at start (exit code {p.returncode}); see its log")
        time.sleep(0.05)
    raise EdgefleetError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None
    )


def start_broker(procs: Procs, run: Path, impl: str) -> tuple[str, str]:
    """(url, implementation): mosquitto when installed (or asked for), else the embedded amqtt."""
    port = free_port()
    mosq = mosquitto_path()
    if impl == "mosquitto" and mosq is None:
        raise UsageError(
            "--broker-impl mosquitto: mosquitto is not installed (apt-get install mosquitto)"
        )
    if impl in ("auto", "mosquitto") and mosq is not None:
        conf = run / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 10000\n" + ("user root\n" if os.geteuid() == 0 else "")
        )
        p = procs.start("broker", [mosq, "-c", str(conf)])
        chosen = "mosquitto"
    else:
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise missing_dependency(
                "amqtt",
                "builder",
                "without mosquitto on PATH, the embedded broker",
                alternative="apt-get install mosquitto",
            ) from None
        p = procs.start("broker", [sys.executable, "-m", "fleet.localfleet", "amqtt", str(port)])
        chosen = "amqtt (embedded, MQTT 3.1.1)"
    _wait_port(port, p, chosen)
    return f"mqtt://127.0.0.1:{port}", chosen


def run_amqtt(port: int) -> None:
    """The embedded broker's process: amqtt on loopback until SIGTERM."""
    import asyncio

    from amqtt.broker import Broker

    async def main() -> None:
        cfg = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(cfg)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "amqtt":
    run_amqtt(int(sys.argv[2]))
