"""`edgefleet broker init` and `edgefleet broker add-device`: certificates, mosquitto config and
ACL for a broker that admits only the fleet's own identities; `edgefleet broker check`: does a
broker do what the fleet relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from agent.errors import BrokerUnfitError, UsageError
from fleet.commands.options import broker_from_options, broker_options_with

DIR_HELP = "Directory holding the broker setup (CA, certificates, mosquitto.conf, acl)."


def _device_spec(spec: str) -> tuple[str, list[str]]:
    """ID or ID:GROUP[,GROUP...]."""
    device, _, groups = spec.partition(":")
    return device, [g for g in groups.split(",") if g]


def _summary(setup: Any, what: str) -> str:
    from fleet.broker_init import agent_snippet

    lines = [what, ""]
    for name, ident in setup.devices.items():
        lines += [
            f"device {name}: {ident.dir}/ (ca.pem, cert.pem, key.pem)",
            "  its agent config's [broker] table (also in agent-broker.toml there):",
            *("    " + ln for ln in agent_snippet(setup.registry, name).splitlines()),
            "",
        ]
    return "\n".join(lines)


@click.group("broker")
def broker_grp() -> None:
    """Set up a locked-down mosquitto (TLS, one certificate per client, an ACL); check a broker.

    \b
    Start with 'edgefleet broker init', then add devices with 'edgefleet broker add-device'.
    'edgefleet broker check' tells whether a broker (any make) does what the fleet needs.
    docs/fleet.md ("Locking down the broker") explains what each identity may do.
    """


@broker_grp.command("init")
@click.option(
    "--dir",
    "directory",
    default="broker",
    show_default=True,
    type=click.Path(path_type=Path),
    help=DIR_HELP,
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Host name or IP address clients use to reach the broker; repeat for each "
    "(default: localhost, 127.0.0.1, ::1). The first one goes into the agents' broker URL.",
)
@click.option("--port", default=8883, show_default=True, type=int, help="TLS listener port.")
@click.option(
    "--bind", default=None, help="Address the listener binds to (default: every interface)."
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="ID[:GROUP,...]",
    help="Issue a certificate for this device (and let it read these groups' deployments); "
    "repeat for each device.",
)
@click.option(
    "--days",
    default=825,
    show_default=True,
    type=int,
    help="Validity of the server and client certificates.",
)
@click.option(
    "--install-dir",
    default="/etc/edgefleet/tls",
    show_default=True,
    help="Where a device keeps its ca.pem, cert.pem and key.pem (for the printed [broker] table).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Start over with a new CA in a directory already set up (every certificate issued before stops working).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def init_cmd(
    directory: Path,
    hosts: tuple[str, ...],
    port: int,
    bind: str | None,
    devices: tuple[str, ...],
    days: int,
    install_dir: str,
    force: bool,
    as_json: bool,
) -> None:
    """Write a CA, the broker's certificate, operator and collector identities, device
    certificates, a mosquitto.conf and an ACL into DIR.

    \b
    Example:
      edgefleet broker init --dir broker --host broker.lan --host 10.0.0.5 \\
          --device rpi-01:lab --device rpi-02:lab,north
      mosquitto -c broker/mosquitto.conf
      edgefleet publish tiny.efa --broker mqtts://broker.lan:8883 --identity broker/operator
      edgefleet collect --broker mqtts://broker.lan:8883 --identity broker/collector --db fleet.db

    Copy each devices/ID/ directory to its device and put the printed [broker] table into the
    agent's config. Keep ca.key away from the broker host: add-device needs it, nothing else does.
    """
    from fleet.broker_init import init_broker

    specs = [_device_spec(s) for s in devices]
    ids = [d for d, _ in specs]
    if len(set(ids)) != len(ids):
        raise UsageError("--device: the same device id is given twice")
    setup = init_broker(
        directory,
        list(hosts) or None,
        port,
        bind,
        dict(specs),
        days=days,
        install_dir=install_dir,
        force=force,
    )
    if as_json:
        click.echo(json.dumps(setup.as_dict()))
        return
    d = setup.dir.resolve()
    click.echo(
        _summary(
            setup,
            f"wrote a broker setup in {d}/ (private keys are mode 0600):\n"
            f"  ca.pem, ca.key          the CA (keep ca.key safe; add-device needs it)\n"
            f"  server.pem, server.key  the broker's certificate for {', '.join(setup.registry.hosts)}\n"
            f"  mosquitto.conf, acl     start the broker: mosquitto -c {setup.conf.resolve()}\n"
            f"  operator/               --identity {setup.operator.dir} for publish, deploy, device cmd\n"
            f"  collector/              --identity {setup.collector.dir} for collect",
        )
    )


@broker_grp.command("add-device")
@click.argument("device_id", metavar="ID")
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="A group whose deployments the device reads; repeat for each.",
)
@click.option(
    "--dir",
    "directory",
    default="broker",
    show_default=True,
    type=click.Path(path_type=Path),
    help=DIR_HELP,
)
@click.option(
    "--force",
    is_flag=True,
    help="Issue a new certificate for a device already added (and replace its groups).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def add_device_cmd(
    device_id: str, groups: tuple[str, ...], directory: Path, force: bool, as_json: bool
) -> None:
    """Issue a certificate for device ID and allow it its topics in the ACL.

    \b
    Example:
      edgefleet broker add-device rpi-03 --group lab --dir broker
      kill -HUP $(pidof mosquitto)      # mosquitto rereads its ACL; clients stay connected

    The device's certificate name (CN) is ID, so it must match device_id in the agent's config.
    """
    from fleet.broker_init import add_device

    setup = add_device(directory, device_id, list(groups), force=force)
    if as_json:
        click.echo(json.dumps(setup.as_dict()))
        return
    click.echo(
        _summary(setup, f"issued a certificate for {device_id} and rewrote {setup.acl}")
        + "\nreload the broker so the ACL takes effect: kill -HUP $(pidof mosquitto)  "
        "(or: systemctl reload mosquitto)"
    )


@broker_grp.command("check")
@broker_options_with(
    "Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT. Give it twice for two nodes of one "
    "cluster: a retained message published on the first must be seen on the second.",
    multiple=True,
)
@click.option(
    "--chunk-size",
    default=1 << 20,  # fleet.publish.DEFAULT_CHUNK_SIZE, not imported: --help stays light
    show_default=True,
    type=click.IntRange(1024, 16 * 1024 * 1024),
    help="Bytes per artifact chunk, as `edgefleet publish --chunk-size` will use.",
)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.5, 60),
    help="Seconds each check waits for a message before it fails.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def check_cmd(chunk_size: int, timeout: float, as_json: bool, **kw: Any) -> None:
    """Check that a broker does what the fleet relies on, before pointing a fleet at it.

    \b
    Checks: retained messages reach wildcard subscriptions; topic names come back unchanged
    ('.' included); QoS 1; Last Will; a retained message of the chunk size; $share
    subscriptions; and, given two --broker URLs, retained messages across cluster nodes.
    Everything happens under a scratch prefix (edgefleet/v1/_check/RANDOM/) and the retained
    messages it leaves are cleared afterwards. Exits 0 when everything holds, 12 when the
    broker breaks something the fleet needs (8 when it cannot be reached). Example:
      edgefleet broker check --broker mqtts://broker.lan:8883 --identity broker/operator
    """
    from fleet.brokercheck import run_checks
    from fleet.mqtt import SyncClient

    urls = list(kw.pop("broker"))
    if len(urls) > 2:
        raise UsageError("--broker: give one URL, or two nodes of one cluster")
    cfgs = [broker_from_options({**kw, "broker": u}) for u in urls]

    def open_client(node: int, will: tuple[str, bytes] | None) -> SyncClient:
        return SyncClient(cfgs[node], timeout=max(timeout, 5.0), will=will).__enter__()

    for node in range(len(cfgs)):  # unreachable is exit 8, before any check runs
        open_client(node, None).close()
    rep = run_checks(open_client, urls, chunk_size, timeout)
    if as_json:
        click.echo(json.dumps(rep.as_dict()))
    else:
        click.echo(_table(rep))
    if not rep.ok:
        failed = [c.name for c in rep.checks if c.status == "fails"]
        raise BrokerUnfitError(
            f"{', '.join(urls)} fails {', '.join(failed)}: the fleet needs "
            f"{'it' if len(failed) == 1 else 'them'} (what it would lose is listed above)"
        )


def _table(rep: Any) -> str:
    width = max(len(c.name) for c in rep.checks)
    lines = [f"broker check of {', '.join(rep.brokers)} (scratch topics under {rep.prefix}/)", ""]
    for c in rep.checks:
        lines.append(f"{c.name:<{width}}  {c.status:<7}  {c.what}")
        if c.detail:
            lines.append(f"{'':<{width}}           {c.detail}")
        if c.loses:
            lines.append(f"{'':<{width}}           the fleet would lose: {c.loses}")
    lines.append("")
    if rep.leftover:
        lines.append(f"could not clear retained scratch topics: {', '.join(rep.leftover)}")
    verdict = (
        "everything the fleet needs holds" if rep.ok else "this broker breaks what the fleet needs"
    )
    lines.append(f"{verdict} ({rep.seconds:.1f}s)")
    return "\n".join(lines)
