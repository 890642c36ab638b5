"""A locked-down mosquitto for a fleet: `edgefleet broker init` and `edgefleet broker add-device`.

One directory holds everything a deployment needs:

    broker.json        what was set up (hosts, port, devices and their groups); the ACL is
                       rendered from it, so adding a device rewrites the ACL whole
    ca.pem, ca.key     the CA that signs every certificate (keep ca.key off the broker host)
    server.pem/.key    the broker's certificate (SANs: the --host names and addresses)
    mosquitto.conf     a TLS listener that requires a client certificate and takes its CN as
                       the user name; no anonymous clients; the ACL below
    acl                who may read and write which topics (docs/fleet.md explains it)
    operator/, collector/, devices/ID/
                       one identity each: ca.pem, cert.pem, key.pem (what --identity takes);
                       a device's directory also holds agent-broker.toml, its [broker] table

Private keys are written 0600. Nothing is overwritten without ``force``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, UsageError
from agent.protocol import topics
from fleet import certs

REGISTRY = "broker.json"
FORMAT = 1
OPERATOR = "edgefleet:operator"  # a ':' can never be in a device id, so no device can take these
COLLECTOR = "edgefleet:collector"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_INSTALL_DIR = "/etc/edgefleet/tls"
P = topics.PREFIX


@dataclass
class Registry:
    """broker.json: the setup the config and the ACL are rendered from."""

    hosts: list[str]
    port: int
    bind: str | None = None
    days: int = 825
    install_dir: str = DEFAULT_INSTALL_DIR
    devices: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {"format": FORMAT, **self.__dict__}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, directory: Path) -> Registry:
        path = directory / REGISTRY
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{directory}: no {REGISTRY} here; run 'edgefleet broker init --dir {directory}' first"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if doc.pop("format", None) != FORMAT:
            raise ConfigError(f"{path}: not a format {FORMAT} edgefleet broker registry")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Identity:
    """Where one client identity's files are: what --identity DIR and the agent's [broker] use."""

    name: str
    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.dir / "cert.pem"

    @property
    def key_file(self) -> Path:
        return self.dir / "key.pem"


def check_device_id(device: str) -> str:
    if not topics.SEGMENT_RE.match(device):
        raise UsageError(f"device id {device!r}: letters, digits, '.', '_' or '-' (at most 64)")
    return device


def check_group(group: str) -> str:
    if not topics.SEGMENT_RE.match(group):
        raise UsageError(f"group {group!r}: letters, digits, '.', '_' or '-' (at most 64)")
    return group


# -- rendering ---------------------------------------------------------------------------------

DEVICE_WRITES = ("state", "events", "telemetry", "cmd/result", "samples")
DEVICE_READS = ("deployment", "cmd")
COLLECTOR_READS = ("state", "events", "telemetry", "cmd/result", "samples")


def render_acl(reg: Registry) -> str:
    """The mosquitto ACL: user names are certificate CNs (``use_identity_as_username``)."""
    out = [
        "# edgefleet broker ACL, rendered from broker.json by `edgefleet broker init` and",
        "# `edgefleet broker add-device` (which rewrite this file: change it through them).",
        "# A user name is the CN of the client's certificate. Anything not granted is denied:",
        "# a denied publish is dropped, a denied subscription receives nothing.",
        "",
        "# Every client (%u is the CN: a device's id) writes only its own reports and reads",
        "# only its own desired deployment and commands. A ':' is never in a device id, so",
        "# the operator's and collector's %u topics belong to no device.",
        *(f"pattern write {P}/devices/%u/{leaf}" for leaf in DEVICE_WRITES),
        *(f"pattern read {P}/devices/%u/{leaf}" for leaf in DEVICE_READS),
        "",
        "# The operator (publish, deploy, device cmd, rollouts, fleet status): all of edgefleet/v1.",
        f"user {OPERATOR}",
        f"topic readwrite {P}/#",
        "",
        "# The collector: every device's reports, read only (shared subscriptions included).",
        f"user {COLLECTOR}",
        *(f"topic read {P}/devices/+/{leaf}" for leaf in COLLECTOR_READS),
        "",
        "# Each device added: the artifact store, the trust document, its groups' deployments.",
    ]
    for device, groups in sorted(reg.devices.items()):
        out += [
            f"user {device}",
            f"topic read {P}/artifacts/#",
            f"topic read {P}/trust",
            *(f"topic read {topics.group_deployment(g)}" for g in groups),
        ]
    return "\n".join(out) + "\n"


def render_conf(directory: Path, reg: Registry) -> str:
    """mosquitto.conf (mosquitto 2.x): one TLS listener, client certificates required."""
    d = directory.resolve()
    listener = f"listener {reg.port}" + (f" {reg.bind}" if reg.bind else "")
    return f"""\
# mosquitto 2.x configuration written by `edgefleet broker init` (docs/fleet.md,
# "Locking down the broker"). Start:  mosquitto -c {d}/mosquitto.conf
# After `edgefleet broker add-device`, reload the ACL without dropping clients:
#   kill -HUP $(pidof mosquitto)     (or: systemctl reload mosquitto)
per_listener_settings false
allow_anonymous false
acl_file {d}/acl
persistence true
persistence_location {d}/data/
# messages kept for a disconnected persistent session (a stopped collector)
max_queued_messages 100000

{listener}
protocol mqtt
cafile {d}/ca.pem
certfile {d}/server.pem
keyfile {d}/server.key
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
"""


def broker_url(reg: Registry) -> str:
    host = reg.hosts[0]
    return f"mqtts://{'[' + host + ']' if ':' in host else host}:{reg.port}"


def agent_snippet(reg: Registry, device: str, install_dir: str | None = None) -> str:
    """The [broker] table of the agent config of ``device``; ``install_dir`` is where its
    ca.pem, cert.pem and key.pem are on the device."""
    d = (install_dir or reg.install_dir).rstrip("/")
    groups = reg.devices.get(device, [])
    return (
        f"# {device}: copy ca.pem, cert.pem, key.pem to {d}/ (key.pem mode 0600, owned by the\n"
        f'# agent\'s user); device_id = "{device}"'
        + (f", groups = {json.dumps(groups)}" if groups else "")
        + "\n[broker]\n"
        f'url = "{broker_url(reg)}"\n'
        f'ca_file = "{d}/ca.pem"\n'
        f'cert_file = "{d}/cert.pem"\n'
        f'key_file = "{d}/key.pem"\n'
    )


# -- operations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What init or add-device wrote."""

    dir: Path
    registry: Registry
    conf: Path
    acl: Path
    operator: Identity
    collector: Identity
    devices: dict[str, Identity]  # the devices this call issued certificates for

    def as_dict(self) -> dict[str, Any]:
        def ident(i: Identity) -> dict[str, str]:
            return {
                "name": i.name,
                "dir": str(i.dir),
                "ca_file": str(i.ca_file),
                "cert_file": str(i.cert_file),
                "key_file": str(i.key_file),
            }

        return {
            "dir": str(self.dir),
            "url": broker_url(self.registry),
            "hosts": self.registry.hosts,
            "port": self.registry.port,
            "mosquitto_conf": str(self.conf),
            "acl": str(self.acl),
            "ca_file": str(self.dir / "ca.pem"),
            "operator": ident(self.operator),
            "collector": ident(self.collector),
            "devices": {
                name: {
                    **ident(i),
                    "groups": self.registry.devices[name],
                    "agent_broker_toml": agent_snippet(self.registry, name),
                }
                for name, i in self.devices.items()
            },
        }


def _issue_identity(ca: certs.Issued, directory: Path, cn: str, days: int) -> Identity:
    ident = Identity(cn, directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    certs.save(certs.issue(ca, cn, days), ident.cert_file, ident.key_file)
    ident.ca_file.write_bytes(certs.cert_pem(ca.cert))
    return ident


def _write_rendered(directory: Path, reg: Registry) -> tuple[Path, Path]:
    (directory / REGISTRY).write_text(reg.to_json())
    acl, conf = directory / "acl", directory / "mosquitto.conf"
    acl.write_text(render_acl(reg))
    conf.write_text(render_conf(directory, reg))
    return conf, acl


def _setup(directory: Path, reg: Registry, issued: list[str]) -> Setup:
    conf, acl = _write_rendered(directory, reg)
    return Setup(
        directory,
        reg,
        conf,
        acl,
        Identity(OPERATOR, directory / "operator"),
        Identity(COLLECTOR, directory / "collector"),
        {d: Identity(d, directory / "devices" / d) for d in issued},
    )


def init_broker(
    directory: Path,
    hosts: list[str] | None = None,
    port: int = 8883,
    bind: str | None = None,
    devices: dict[str, list[str]] | None = None,
    days: int = 825,
    ca_days: int = 3650,
    install_dir: str = DEFAULT_INSTALL_DIR,
    force: bool = False,
) -> Setup:
    """A new CA, server certificate, operator, collector and device identities, mosquitto.conf
    and ACL in ``directory``. Refuses a directory already set up unless ``force`` (which makes a
    new CA: every certificate issued before stops working)."""
    hosts = [certs.check_host(h) for h in (hosts or DEFAULT_HOSTS)]
    devices = {
        check_device_id(d): [check_group(g) for g in gs] for d, gs in (devices or {}).items()
    }
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: not a TCP port")
    if days < 1 or ca_days < days:
        raise UsageError("--days must be at least 1 and not beyond the CA's validity")
    existing = [n for n in (REGISTRY, "ca.key", "ca.pem") if (directory / n).exists()]
    if existing and not force:
        raise UsageError(
            f"{directory} already holds a broker setup ({', '.join(existing)}); "
            "use 'edgefleet broker add-device' to add devices, or --force to start over with a new CA"
        )
    directory.mkdir(parents=True, exist_ok=True)
    if force:
        for sub in ("operator", "collector", "devices"):
            shutil.rmtree(directory / sub, ignore_errors=True)
    (directory / "data").mkdir(exist_ok=True)
    ca = certs.make_ca(days=ca_days)
    certs.save(ca, directory / "ca.pem", directory / "ca.key")
    certs.save(
        certs.issue(ca, hosts[0], days, server_hosts=hosts),
        directory / "server.pem",
        directory / "server.key",
    )
    _issue_identity(ca, directory / "operator", OPERATOR, days)
    _issue_identity(ca, directory / "collector", COLLECTOR, days)
    reg = Registry(hosts=hosts, port=port, bind=bind, days=days, install_dir=install_dir)
    for device, groups in devices.items():
        _issue_device(ca, directory, reg, device, groups)
    return _setup(directory, reg, list(devices))


def _issue_device(
    ca: certs.Issued, directory: Path, reg: Registry, device: str, groups: list[str]
) -> None:
    ident = _issue_identity(ca, directory / "devices" / device, device, reg.days)
    reg.devices[device] = sorted(set(groups))
    (ident.dir / "agent-broker.toml").write_text(agent_snippet(reg, device))


def add_device(
    directory: Path, device: str, groups: list[str] | None = None, force: bool = False
) -> Setup:
    """Issue a certificate for ``device`` and re-render the ACL with its ``groups``. A device
    already set up is refused unless ``force`` (a new certificate; the old one stays valid until
    it expires, and its rights are the new ones)."""
    device = check_device_id(device)
    groups = [check_group(g) for g in groups or []]
    reg = Registry.read(directory)
    if device in reg.devices and not force:
        raise UsageError(
            f"device {device} already has a certificate in {directory}/devices/{device}; "
            "--force issues a new one (and replaces its groups)"
        )
    ca = certs.load(directory / "ca.pem", directory / "ca.key")
    _issue_device(ca, directory, reg, device, groups)
    return _setup(directory, reg, [device])
