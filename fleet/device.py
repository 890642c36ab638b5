"""`edgefleet device cmd`: send one command to a device and print its answer.

The result topic is subscribed (and the SUBACK awaited) before the command goes out, so a fast
answer cannot be missed. Connecting is retried a bounded number of times; the command itself
is sent once (a repeated rollback would roll back twice).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import click
from pydantic import ValidationError

from agent.broker import BrokerConfig
from agent.errors import CommandFailed, NoAnswerError, UsageError
from agent.protocol import topics
from agent.protocol.messages import (
    COMMAND_OPS,
    Command,
    CommandResult,
    MessageError,
    decode,
    encode,
)
from fleet.commands import _broker, broker_options
from fleet.mqtt import SyncClient, connect

CONNECT_TRIES = 3


def _device_online(c: SyncClient, device: str) -> str:
    """A hint for a timeout from the device's retained state message."""
    got = c.retained(topics.device_topic(device, "state"), quiet=0.2, limit=1.0)
    for payload in got.values():
        try:
            doc = json.loads(payload)
        except ValueError:
            break
        if isinstance(doc, dict):
            return "it is online" if doc.get("online") else "its last state says offline"
    return "it has never reported a state on this broker"


def send_command(cfg: BrokerConfig, device: str, cmd: Command, timeout: float) -> CommandResult:
    """Publish ``cmd`` on the device's cmd topic and wait for the result with the same id."""
    try:
        cmd_topic = topics.device_topic(device, "cmd")
        result_topic = topics.device_topic(device, "cmd/result")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    c = connect(cfg, CONNECT_TRIES, timeout=5.0)
    try:
        answers = c.listen([(result_topic, 1)], wait=True)
        c.publish(cmd_topic, encode(cmd), retain=False)
        c.flush()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            item = answers.get(left)
            if item is None:
                break
            payload = item.payload
            try:
                res = decode(CommandResult, payload)
            except MessageError:
                continue
            if res.id == cmd.id:
                return res
        raise NoAnswerError(f"device {device} did not answer '{cmd.op}' within {timeout:g}s "
                            f"({_device_online(c, device)})")
    finally:
        c.close()


def _resolve_sha(cfg: BrokerConfig, device: str, name: str, version: str) -> str:
    """deploy without --sha256: the published artifact of NAME@VERSION for the device's profile."""
    from fleet.deploy import resolve

    c = connect(cfg, CONNECT_TRIES, timeout=5.0)
    try:
        return resolve(c, name, version, None, device, None).sha256
    finally:
        c.close()


def build_command(op: str, version: str | None, runs: int | None, name: str | None,
                  sha256: str | None) -> Command:
    try:
        return Command(id=f"cli-{uuid.uuid4().hex[:12]}", op=op, version=version, runs=runs, name=name,
                       sha256=sha256)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UsageError(f"--{'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None


def _human(op: str, res: CommandResult) -> str:
    d = res.detail
    if op == "benchmark" and "p95_ms" in d:
        th = d.get("thermal", {})
        heat = (f", max {th['max_temp_c']:g} °C" if "max_temp_c" in th else "") + \
            (", THROTTLED" if th.get("throttled") else "")
        return (f"{d.get('model')}: {d['runs']} runs, p50 {d['p50_ms']:.3f} ms, p95 {d['p95_ms']:.3f} ms, "
                f"p99 {d['p99_ms']:.3f} ms{heat}")
    if op == "status":
        a = d.get("active")
        lines = [f"active: {a['name']} {a['version']} ({a['sha256'][:16]})" if a else "active: none",
                 f"kept: {', '.join(d.get('kept', [])) or 'none'}",
                 f"probation: {'yes' if d.get('probation') else 'no'}"]
        if d.get("fetching"):
            f = d["fetching"]
            lines.append(f"fetching {f['sha256'][:16]}: {f['done']}/{f['chunks']} chunks")
        return "\n".join(lines)
    if op == "rollback":
        return f"rolled back; active: {d.get('active') or 'none'}"
    return f"{op}: ok" + (f" {json.dumps(d)}" if d else "")


@click.group("device")
def device_grp() -> None:
    """Talk to one device through the broker."""


@device_grp.command("cmd")
@click.argument("device_id", metavar="ID")
@click.argument("op", metavar="OP")
@click.option("--version", "version", default=None,
              help="rollback: the kept version to go back to (default: the previous one); deploy: the version.")
@click.option("--runs", type=int, default=None, help="benchmark: how many inferences (the device caps it).")
@click.option("--name", default=None, help="deploy: model name.")
@click.option("--sha256", default=None,
              help="deploy: artifact sha256 (default: looked up among the published NAME@VERSION).")
@broker_options
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the device's answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the device's answer as one JSON object.")
def cmd_cmd(device_id: str, op: str, version: str | None, runs: int | None, name: str | None,
            sha256: str | None, timeout: float, as_json: bool, **kw: Any) -> None:
    """Send command OP to device ID and print its answer.

    \b
    OP is one of: deploy, rollback, benchmark, rebirth, status. Examples:
      edgefleet device cmd rpi-07 status --broker mqtt://broker.lan:1883
      edgefleet device cmd rpi-07 rollback --version 1.1.0 --broker mqtt://broker.lan:1883
      edgefleet device cmd rpi-07 benchmark --runs 200 --broker mqtt://broker.lan:1883 --json

    Exits 0 when the device answered ok, 10 when it refused (the reason is printed),
    9 when it did not answer in time, 8 when the broker cannot be reached.
    """
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    if op not in COMMAND_OPS:
        # still sent: a newer agent may know it; an older one answers ok:false with a reason
        click.echo(f"warning: '{op}' is not one of {', '.join(COMMAND_OPS)}", err=True)
    broker = _broker(kw)
    if op == "deploy" and name and version and not sha256:
        sha256 = _resolve_sha(broker, device_id, name, version)
    cmd = build_command(op, version, runs, name, sha256)
    res = send_command(broker, device_id, cmd, timeout)
    if as_json:
        click.echo(json.dumps(res.model_dump(mode="json")))
    elif res.ok:
        click.echo(_human(op, res))
    if not res.ok:
        raise CommandFailed(f"device {device_id} refused '{op}': {res.reason}")
