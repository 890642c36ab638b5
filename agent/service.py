"""systemd integration: sd_notify (READY, WATCHDOG, STATUS) without a systemd library, and the unit file.

``Notifier`` sends datagrams to $NOTIFY_SOCKET (a path, or '@name' in the abstract namespace);
without it every call is a no-op, so the agent runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.protocol.topics import SEGMENT_RE

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify for Type=notify units; the watchdog is pinged at half of $WATCHDOG_USEC."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = {} if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = ("\0" + addr[1:]) if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self._last_status = ""
        self.interval_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval_s = int(usec) / 1e6 / 2
        self._next_ping = 0.0

    @classmethod
    def from_environ(cls) -> Notifier:
        return cls(os.environ)

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def send(self, *fields: str, wait_s: float = 0.0) -> bool:
        """Send 'KEY=value' lines in one datagram; False if it did not go (logged)."""
        if not self._addr:
            return False
        try:
            if self._sock is None:
                # non-blocking: a reader that falls behind must never stall the agent's main loop
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            data, deadline = "\n".join(fields).encode(), time.monotonic() + wait_s
            while True:
                try:
                    self._sock.sendto(data, self._addr)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        log.debug("sd_notify queue full; dropped %s", fields[0])
                        return False
                    time.sleep(0.01)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._addr.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}", wait_s=2.0)
        if self.interval_s is not None:
            self._next_ping = time.monotonic() + self.interval_s

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Call from the main loop: pings at most every half watchdog interval (cheap otherwise)."""
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.interval_s
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping", wait_s=1.0)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


UNIT_NAME = "edgefleet-agent.service"
# The config and keys reach the service as credentials (LoadCredential=): systemd, as root, copies
# them into a directory only the unit's user can read ($CREDENTIALS_DIRECTORY, "%d" in the unit),
# so a DynamicUser (whose uid is unknown in advance, so no file can be chowned or grouped to it)
# reads a root-owned 0640 config and 0600 private key without anything being opened to other
# users. A directory credential flattens keys/NAME to keys_NAME; load_config resolves the relative
# path keys/NAME in the config to either, so one config works in /etc/edgefleet and in %d.
# ProtectSystem=strict leaves only StateDirectory (/var/lib/edgefleet) and RuntimeDirectory
# (/run/edgefleet) writable. PrivateDevices hides accelerators: a Jetson needs a drop-in with
# PrivateDevices=no and DeviceAllow= for /dev/nvhost-*. MemoryDenyWriteExecute is left out on
# purpose: runtime kernels (XNNPACK, some onnxruntime EPs) may generate code at run time.
UNIT_TEMPLATE = """\
[Unit]
Description=edgefleet device agent (signed model updates over MQTT, local inference endpoint)
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
{exec_lines}
Restart=on-failure
RestartSec=5s
WatchdogSec=30s
TimeoutStartSec=120s
TimeoutStopSec=20s
{user_lines}
StateDirectory=edgefleet
StateDirectoryMode=0750
ConfigurationDirectory=edgefleet
RuntimeDirectory=edgefleet
RuntimeDirectoryMode=0755
UMask=0027
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
DevicePolicy=closed
KeyringMode=private

[Install]
WantedBy=multi-user.target
"""

CONFIG_SKELETON = """\
# edgefleet agent config: check it with `edgefleet-agent check-config {config}`.
# Every key is described in docs/protocol.md, "Agent configuration".
device_id = "{device}"
profile = "CHANGE-ME"             # the device profile this device serves (e.g. rpi4)
groups = []
state_dir = "/var/lib/edgefleet"  # systemd's StateDirectory=edgefleet
# Keys and certificates go in /etc/edgefleet/keys/ (flat, no subdirectories) and are named
# relative to this file: the service reads them, and this file, as systemd credentials.
root_key = "keys/root.pub"        # the pinned root of trust (docs/security.md)
trust_file = "keys/trust.json"    # the root-signed trust document (edgefleet keys init-root)

[broker]
url = "mqtt://broker.lan:1883"

[serve]
host = "127.0.0.1"
port = 8000
"""


def render_unit(
    executable: str, config: str = "/etc/edgefleet/agent.toml", user: str | None = None
) -> str:
    """The unit text. DynamicUser by default: the config and the flat keys/ directory beside it
    are passed as credentials (systemd >= 251: a directory credential, %d). A fixed ``user``
    (which must exist; the way on an older systemd) reads them in place: give its group read
    access to them."""
    if user is None:
        user_lines = "DynamicUser=yes"
        keys = Path(config).parent / "keys"
        exec_lines = (
            f"LoadCredential=agent.toml:{config}\nLoadCredential=keys:{keys}\n"
            f"ExecStart={executable} run --config %d/agent.toml"
        )
    else:
        user_lines = f"User={user}\nGroup={user}"
        exec_lines = f"ExecStart={executable} run --config {config}"
    return UNIT_TEMPLATE.format(exec_lines=exec_lines, user_lines=user_lines)


def install_service(
    root: Path, user: str | None, executable: str | None, force: bool
) -> dict[str, Any]:
    """Write the unit and (unless one exists and not ``force``) the config skeleton under ``root``."""
    if user is not None and not SEGMENT_RE.match(user):
        raise UsageError(f"--user {user!r}: not a valid user name")
    exe = executable or shutil.which("edgefleet-agent") or str(Path(sys.argv[0]).resolve())
    if not Path(exe.split()[0]).is_absolute():
        raise UsageError(f"--exec {exe!r}: give an absolute path")
    unit = root / "etc/systemd/system" / UNIT_NAME
    config = root / "etc/edgefleet/agent.toml"
    try:
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(render_unit(exe, "/etc/edgefleet/agent.toml", user))
        written = force or not config.exists()
        keys = config.parent / "keys"  # LoadCredential=keys: the unit does not start without it
        keys.mkdir(mode=0o750, parents=True, exist_ok=True)
        if written:
            config.parent.mkdir(parents=True, exist_ok=True)
            device = (
                re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].lstrip("._-") or "device"
            )
            config.write_text(
                CONFIG_SKELETON.format(config="/etc/edgefleet/agent.toml", device=device)
            )
            config.chmod(0o640)
    except OSError as exc:
        raise UsageError(f"cannot write under {root}: {exc.strerror or exc}") from None
    return {
        "unit": str(unit),
        "config": str(config),
        "config_written": written,
        "keys_dir": str(keys),
        "exec": exe,
        "user": user,
    }


def trim_memory() -> None:
    """Give freed heap back to the OS (glibc malloc_trim): after start-up and after a model swap,
    a small device should not keep the peak. A no-op where glibc is absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
