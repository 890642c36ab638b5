"""Messages into rows: one MQTT message on a device's state, events, telemetry, cmd/result or
samples topic decoded into the rows of a ``Batch`` (fleet/db.py) that the collector commits.
A message that does not decode or validate becomes a ``rejected`` row (topic, reason, size and
the start of the payload), never an exception, so bad input cannot stop the collector.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.protocol import topics
from agent.protocol.messages import (
    CommandResult,
    Event,
    MessageError,
    StateMessage,
    Telemetry,
    decode,
)
from fleet.db import Batch
from fleet.gen_store import generation_row
from fleet.monitor_store import monitor_row
from fleet.samples_store import SampleLimit, sample_row

MAX_PAYLOAD = 64 * 1024  # larger messages on these topics are rejected, not parsed
PREFIX_CHARS = 200  # how much of a rejected payload is kept
_MODELS: dict[str, type[BaseModel]] = {
    "state": StateMessage,
    "events": Event,
    "telemetry": Telemetry,
    "cmd_result": CommandResult,
}


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def add_message(
    batch: Batch, topic: str, payload: bytes, received: float, limit: SampleLimit | None = None
) -> bool:
    """Decode one message into ``batch``; a bad one becomes a ``rejected`` row. True if accepted.
    ``limit`` bounds captured samples (devices/+/samples; fleet/samples_store.py)."""
    t = topics.parse(topic)
    if t is not None and t.kind == "samples" and t.device is not None:
        limit = limit or SampleLimit()
        row = limit.check(topic, len(payload)) or sample_row(
            t.device, payload, received, limit.max_bytes
        )
        if isinstance(row, str):
            return _reject(batch, topic, row, payload, received)
        batch.rows["samples"].append(row)
        batch.seen[t.device] = max(received, batch.seen.get(t.device, 0.0))
        return True
    if t is None or t.kind not in _MODELS or t.device is None:
        return _reject(
            batch,
            topic,
            "not an edgefleet device state/events/telemetry/cmd/result topic",
            payload,
            received,
        )
    model = _MODELS[t.kind]
    msg: Any
    try:
        if len(payload) > MAX_PAYLOAD:
            raise MessageError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD} allowed")
        try:
            msg = model.model_validate_json(payload)  # fast path; decode() words the reason
        except ValidationError:
            msg = decode(model, payload, MAX_PAYLOAD)
    except MessageError as exc:
        return _reject(batch, topic, str(exc), payload, received)
    dev = t.device
    if t.kind != "cmd_result" and msg.device != dev:
        return _reject(
            batch,
            topic,
            f"device '{msg.device}' in the payload does not match the topic",
            payload,
            received,
        )
    r = batch.rows
    if isinstance(msg, Telemetry):
        a, lat = msg.active, msg.latency
        temps = msg.temperatures_c
        r["telemetry"].append(
            (
                dev,
                msg.seq,
                msg.ts,
                received,
                msg.interval_s,
                msg.uptime_s,
                a.name if a else None,
                a.version if a else None,
                a.sha256 if a else None,
                lat.count,
                lat.errors,
                lat.throughput_per_s,
                lat.p50_ms,
                lat.p95_ms,
                lat.p99_ms,
                lat.max_ms,
                msg.rss_mb,
                msg.cpu_percent,
                msg.mem_available_mb,
                max(temps.values()) if temps else None,
                _dumps(temps) if temps else None,
                msg.throttled,
                msg.cpu_freq_mhz,
                msg.buffer.get("pending"),
                msg.buffer.get("dropped"),
            )
        )
        if (mon := monitor_row(dev, msg, received)) is not None:
            r["monitor"].append(mon)
        if (gen := generation_row(dev, msg, received)) is not None:
            r["generation"].append(gen)
    elif isinstance(msg, StateMessage):
        a = msg.active
        model_cols = (a.name, a.version, a.sha256) if a else (None, None, None)
        groups = _dumps(msg.groups)
        r["states"].append(
            (
                dev,
                msg.seq,
                msg.ts,
                received,
                msg.online,
                msg.profile,
                msg.agent_version,
                groups,
                *model_cols,
            )
        )
        # arrival order decides the current state: a Last Will carries an older seq than later births
        batch.device_states.append(
            (
                dev,
                msg.online,
                msg.profile,
                msg.agent_version,
                groups,
                *model_cols,
                msg.seq,
                msg.ts,
                received,
            )
        )
    elif isinstance(msg, Event):
        r["events"].append(
            (
                dev,
                msg.seq,
                msg.ts,
                received,
                msg.kind,
                msg.state,
                msg.name,
                msg.version,
                msg.sha256,
                msg.reason,
                _dumps(msg.detail),
            )
        )
    else:
        r["cmd_results"].append((dev, msg.id, received, msg.ok, msg.reason, _dumps(msg.detail)))
    if received > batch.seen.get(dev, 0.0):
        batch.seen[dev] = received
    return True


def _reject(batch: Batch, topic: str, reason: str, payload: bytes, received: float) -> bool:
    prefix = payload[: PREFIX_CHARS * 4].decode("utf-8", errors="replace")[:PREFIX_CHARS]
    batch.rows["rejected"].append((received, topic[:512], reason[:1000], len(payload), prefix))
    return False
