"""`edgefleet device cmd`: one command to one device, and its answer."""

from __future__ import annotations

import json
from typing import Any

import click

from agent.errors import CommandFailed, UsageError
from agent.protocol.messages import COMMAND_OPS
from fleet.commands.options import broker_from_options, broker_options, operator_option
from fleet.device import build_command, deploy_fields, human, send_command


@click.group("device")
def device_grp() -> None:
    """Talk to one device through the broker."""


@device_grp.command("cmd")
@click.argument("device_id", metavar="ID")
@click.argument("op", metavar="OP")
@click.option(
    "--version",
    "version",
    default=None,
    help="rollback: the kept version to go back to (default: the previous one); deploy: the version.",
)
@click.option(
    "--runs", type=int, default=None, help="benchmark: how many inferences (the device caps it)."
)
@click.option("--name", default=None, help="deploy: model name.")
@click.option(
    "--sha256",
    default=None,
    help="deploy: artifact sha256 (default: looked up among the published NAME@VERSION).",
)
@broker_options
@operator_option
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the device's answer.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the device's answer as one JSON object."
)
def cmd_cmd(
    device_id: str,
    op: str,
    version: str | None,
    runs: int | None,
    name: str | None,
    sha256: str | None,
    timeout: float,
    operator_key: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Send command OP to device ID and print its answer.

    \b
    OP is one of: deploy, rollback, benchmark, rebirth, status. Examples:
      edgefleet device cmd rpi-07 status --broker mqtt://broker.lan:1883
      edgefleet device cmd rpi-07 rollback --version 1.1.0 --broker mqtt://broker.lan:1883
      edgefleet device cmd rpi-07 benchmark --runs 200 --broker mqtt://broker.lan:1883 --json

    The command is signed with the operator key (--operator-key or $EDGEFLEET_OPERATOR_KEY) and
    is valid for 10 minutes. Exits 0 when the device answered ok, 10 when it refused (the reason is printed),
    9 when it did not answer in time, 8 when the broker cannot be reached.
    """
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    if op not in COMMAND_OPS:
        raise UsageError(f"unknown op '{op}': one of {', '.join(COMMAND_OPS)}")
    from fleet.trust import operator

    signer = operator(operator_key)
    broker = broker_from_options(kw)
    fields: dict[str, Any] = {}
    if op == "deploy":
        if not (name and version):
            raise UsageError("deploy needs --name and --version")
        fields = deploy_fields(broker, device_id, name, version, sha256)
    cmd = build_command(op, version, runs, name, fields)
    res = send_command(broker, device_id, cmd, timeout, signer)
    if as_json:
        click.echo(json.dumps(res.model_dump(mode="json")))
    elif res.ok:
        click.echo(human(op, res))
    if not res.ok:
        raise CommandFailed(f"device {device_id} refused '{op}': {res.reason}")
