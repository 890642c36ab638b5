"""Text generation on the fleet side: the ``generation`` block of a telemetry message (decode
tokens/s, TTFT p50/p95, tokens, queue, rejections) as one ``generation`` row, and reads of it
for the views, the report and the canary gate. A device serving no text model sends no block
and has no rows.
"""

from __future__ import annotations

from typing import Any

from agent.protocol.messages import Telemetry
from fleet.db import FleetDB
from fleet.monitor_store import window_key


def generation_row(dev: str, msg: Telemetry, received: float) -> tuple[Any, ...] | None:
    """The ``generation`` table row of a telemetry message, or None when it has no such block."""
    g = msg.generation
    if g is None:
        return None
    return (
        *window_key(dev, msg, received),
        g.requests,
        g.tokens,
        g.tok_s,
        g.ttft_p50_ms,
        g.ttft_p95_ms,
        g.queue_max,
        g.rejected,
        g.errors,
        g.cancelled,
    )


_LATEST = """
SELECT g.device, g.tok_s, g.ttft_p95_ms
FROM generation g JOIN (
  SELECT device, MAX(seq) AS seq FROM generation WHERE tok_s IS NOT NULL GROUP BY device
) l ON g.device = l.device AND g.seq = l.seq
"""


def latest_tok_s(db: FleetDB) -> dict[str, float]:
    """device -> tokens/s of its latest window that measured one (none before schema 4)."""
    if not db.has_table("generation"):
        return {}
    return {r["device"]: float(r["tok_s"]) for r in db.query(_LATEST)}


def windows(db: FleetDB, device: str) -> list[dict[str, Any]]:
    """A device's generation windows in time order (ts, tok_s, ttft p50/p95, tokens, rejected)."""
    if not db.has_table("generation"):
        return []
    return db.query(
        "SELECT ts, version, tok_s, ttft_p50_ms, ttft_p95_ms, tokens, queue_max, rejected "
        "FROM generation WHERE device = ? ORDER BY ts",
        (device,),
    )
