"""Model monitoring on the fleet side: the ``monitor`` block of a telemetry message (drift of
inputs/outputs against the artifact's reference profile, class counts, confidence, non-finite
outputs) as one ``monitor`` row, and the latest window per device for the views.

The block is free-form on the wire (``dict[str, Any]``), so every field is read defensively:
a value of the wrong type is stored as NULL, never rejected, and the whole block is kept as
JSON for anything a column does not carry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import Telemetry
from fleet.db import FleetDB


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    f = _num(v)
    return int(f) if f is not None else None


@dataclass(frozen=True)
class MonitorWindow:
    """The figures of one monitor block that the database, the views and the gate use."""

    count: int | None = None
    metric: str | None = None
    drift_max: float | None = None
    mean_confidence: float | None = None
    low_confidence_rate: float | None = None
    non_finite: int | None = None
    drifting: bool | None = None
    classes: dict[str, float] | None = None

    @classmethod
    def parse(cls, block: dict[str, Any]) -> MonitorWindow:
        drift = block.get("drift")
        dmax = None
        if isinstance(drift, dict):
            dmax = _num(drift.get("max"))
            if dmax is None:  # no summary: the largest score the block carries
                scores = [_num(drift.get("classes"))]
                for part in ("inputs", "outputs"):
                    sub = drift.get(part)
                    if isinstance(sub, dict):
                        scores += [_num(v) for v in sub.values()]
                dmax = max((s for s in scores if s is not None), default=None)
        classes = block.get("classes")
        counts = None
        if isinstance(classes, dict):
            counts = {str(k): n for k, v in classes.items() if (n := _num(v)) is not None and n > 0}
        drifting = block.get("drifting")
        metric = block.get("metric")
        return cls(
            count=_int(block.get("count")),
            metric=metric if isinstance(metric, str) else None,
            drift_max=dmax,
            mean_confidence=_num(block.get("mean_confidence")),
            low_confidence_rate=_num(block.get("low_confidence_rate")),
            non_finite=_int(block.get("non_finite")),
            drifting=drifting if isinstance(drifting, bool) else None,
            classes=counts,
        )


def window_key(dev: str, msg: Telemetry, received: float) -> tuple[Any, ...]:
    """The leading columns of a per-window table (monitor, generation): the message's device,
    seq, times and the model it describes (fleet.schema's _MSG and _MODEL columns)."""
    a = msg.active
    return (
        dev,
        msg.seq,
        msg.ts,
        received,
        a.name if a else None,
        a.version if a else None,
        a.sha256 if a else None,
    )


def monitor_row(dev: str, msg: Telemetry, received: float) -> tuple[Any, ...] | None:
    """The ``monitor`` table row of a telemetry message, or None when it has no monitor block."""
    if not msg.monitor:
        return None
    w = MonitorWindow.parse(msg.monitor)
    return (
        *window_key(dev, msg, received),
        w.count,
        w.metric,
        w.drift_max,
        w.mean_confidence,
        w.low_confidence_rate,
        w.non_finite,
        w.drifting,
        json.dumps(msg.monitor, separators=(",", ":"), sort_keys=True, default=str),
    )


_LATEST = """
SELECT m.device, m.drift_max, m.drifting, m.mean_confidence
FROM monitor m JOIN (SELECT device, MAX(seq) AS seq FROM monitor GROUP BY device) l
  ON m.device = l.device AND m.seq = l.seq
"""


def latest_windows(db: FleetDB) -> dict[str, dict[str, Any]]:
    """device -> its latest monitor window (drift_max, drifting, mean_confidence); empty when the
    database predates the monitor table (schema 1, not yet upgraded by a collector)."""
    if not db.has_table("monitor"):
        return {}
    return {r["device"]: r for r in db.query(_LATEST)}


def windows(db: FleetDB, device: str) -> list[dict[str, Any]]:
    """A device's monitor windows in time order (ts, drift_max, confidence, drifting)."""
    if not db.has_table("monitor"):
        return []
    return db.query(
        "SELECT ts, drift_max, mean_confidence, low_confidence_rate, drifting FROM monitor "
        "WHERE device = ? ORDER BY ts",
        (device,),
    )
