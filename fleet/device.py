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

from pydantic import ValidationError

from agent.broker import BrokerConfig
from agent.errors import NoAnswerError, UsageError
from agent.protocol import topics
from agent.protocol.messages import (
    Command,
    CommandResult,
    MessageError,
    decode,
)
from fleet.mqtt import SyncClient, connect
from fleet.trust import Operator

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


def send_command(
    cfg: BrokerConfig, device: str, cmd: Command, timeout: float, operator: Operator
) -> CommandResult:
    """Seal ``cmd`` with the operator key, publish it on the device's cmd topic and wait for
    the result with the same id."""
    try:
        cmd_topic = topics.device_topic(device, "cmd")
        result_topic = topics.device_topic(device, "cmd/result")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    c = connect(cfg, CONNECT_TRIES, timeout=5.0)
    try:
        answers = c.listen([(result_topic, 1)], wait=True)
        body = cmd.model_dump(mode="json", exclude_none=True)
        c.publish(cmd_topic, operator.command(device, body), retain=False)
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
        raise NoAnswerError(
            f"device {device} did not answer '{cmd.op}' within {timeout:g}s "
            f"({_device_online(c, device)})"
        )
    finally:
        c.close()


def deploy_fields(
    cfg: BrokerConfig, device: str, name: str, version: str, sha256: str | None
) -> dict[str, Any]:
    """A deploy command's sha256, size and chunk table digest: the published artifact of
    NAME@VERSION for the device's profile (which must be ``sha256`` when one is given)."""
    from fleet.deploy import chunk_digest, resolve

    c = connect(cfg, CONNECT_TRIES, timeout=5.0)
    try:
        entry = resolve(c, name, version, None, device, None)
        if sha256 is not None and sha256 != entry.sha256:
            raise UsageError(
                f"{name}@{version} for this device is published as {entry.sha256[:16]}, "
                f"not {sha256[:16]}"
            )
        return {"sha256": entry.sha256, "size": entry.size, "chunks_sha256": chunk_digest(c, entry)}
    finally:
        c.close()


def build_command(
    op: str,
    version: str | None,
    runs: int | None,
    name: str | None,
    deploy: dict[str, Any] | None = None,
) -> Command:
    try:
        return Command(
            id=f"cli-{uuid.uuid4().hex[:12]}",
            op=op,
            version=version,
            runs=runs,
            name=name,
            **(deploy or {}),
        )
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UsageError(f"--{'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None


def human(op: str, res: CommandResult) -> str:
    d = res.detail
    if op == "benchmark" and "p95_ms" in d:
        th = d.get("thermal", {})
        heat = (f", max {th['max_temp_c']:g} °C" if "max_temp_c" in th else "") + (
            ", THROTTLED" if th.get("throttled") else ""
        )
        return (
            f"{d.get('model')}: {d['runs']} runs, p50 {d['p50_ms']:.3f} ms, p95 {d['p95_ms']:.3f} ms, "
            f"p99 {d['p99_ms']:.3f} ms{heat}"
        )
    if op == "status":
        a = d.get("active")
        lines = [
            f"active: {a['name']} {a['version']} ({a['sha256'][:16]})" if a else "active: none",
            f"kept: {', '.join(d.get('kept', [])) or 'none'}",
            f"probation: {'yes' if d.get('probation') else 'no'}",
        ]
        if d.get("fetching"):
            f = d["fetching"]
            lines.append(f"fetching {f['sha256'][:16]}: {f['done']}/{f['chunks']} chunks")
        return "\n".join(lines)
    if op == "rollback":
        return f"rolled back; active: {d.get('active') or 'none'}"
    return f"{op}: ok" + (f" {json.dumps(d)}" if d else "")
