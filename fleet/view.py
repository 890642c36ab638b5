"""One row per device (online, model, latest latency, memory, CPU, temperature, throttling,
model drift and confidence, last seen), read from the fleet database or live from the broker, rendered as a rich table or
JSON. `fleet status`, `fleet watch` and the demo share this code.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from agent.broker import BrokerConfig
from agent.protocol import topics
from agent.protocol.messages import MessageError, StateMessage, Telemetry, decode
from fleet.db import FleetDB
from fleet.gen_store import latest_tok_s
from fleet.monitor_store import MonitorWindow, latest_windows
from fleet.mqtt import Listener, SyncClient


@dataclass(frozen=True)
class DeviceRow:
    device: str
    online: bool | None = None
    profile: str | None = None
    model: str | None = None
    version: str | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    tok_s: float | None = None  # decode tokens/s of the latest window with text generation
    rss_mb: float | None = None
    cpu_percent: float | None = None
    temp_max_c: float | None = None
    throttled: bool | None = None
    drift: float | None = None  # the latest monitor window's max drift score
    drifting: bool | None = None  # the agent judged that window drifting
    mean_confidence: float | None = None
    last_seen: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_LATEST_TELEMETRY = """
SELECT t.device, t.p50_ms, t.p95_ms, t.rss_mb, t.cpu_percent, t.temp_max_c, t.throttled,
       t.model, t.version
FROM telemetry t JOIN (SELECT device, MAX(seq) AS seq FROM telemetry GROUP BY device) m
  ON t.device = m.device AND t.seq = m.seq
"""


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


def rows_from_db(db: FleetDB) -> list[DeviceRow]:
    """Every device the database knows, with its current state and latest telemetry."""
    tel = {r["device"]: r for r in db.query(_LATEST_TELEMETRY)}
    mon = latest_windows(db)
    tok = latest_tok_s(db)
    out = []
    for d in db.query("SELECT * FROM devices ORDER BY device"):
        t = tel.get(d["device"], {})
        m = mon.get(d["device"], {})
        out.append(
            DeviceRow(
                device=d["device"],
                online=_bool(d["online"]),
                profile=d["profile"],
                model=d["model"] or t.get("model"),
                version=d["version"] or t.get("version"),
                p50_ms=t.get("p50_ms"),
                p95_ms=t.get("p95_ms"),
                tok_s=tok.get(d["device"]),
                rss_mb=t.get("rss_mb"),
                cpu_percent=t.get("cpu_percent"),
                temp_max_c=t.get("temp_max_c"),
                throttled=_bool(t.get("throttled")),
                drift=m.get("drift_max"),
                drifting=_bool(m.get("drifting")),
                mean_confidence=m.get("mean_confidence"),
                last_seen=d["last_seen"],
            )
        )
    return out


class LiveFleet:
    """Keeps a DeviceRow per device from retained state and telemetry seen on the broker."""

    def __init__(self, broker: BrokerConfig, timeout: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.rows: dict[str, DeviceRow] = {}
        self.telemetry_from: set[str] = set()  # devices whose telemetry arrived while listening
        self.client = SyncClient(broker, timeout=timeout)
        self._listener: Listener | None = None

    def apply(self, topic: str, payload: bytes, received: float) -> None:
        """Fold one message into the rows; anything that does not decode is ignored here."""
        t = topics.parse(topic)
        if t is None or t.device is None or t.kind not in ("state", "telemetry"):
            return
        msg: StateMessage | Telemetry
        try:
            msg = decode(StateMessage, payload) if t.kind == "state" else decode(Telemetry, payload)
        except MessageError:
            return
        with self._lock:
            row = self.rows.get(t.device, DeviceRow(t.device))
            if isinstance(msg, StateMessage):
                a = msg.active
                row = replace(
                    row,
                    online=msg.online,
                    profile=msg.profile,
                    model=a.name if a else None,
                    version=a.version if a else None,
                )
                # a retained state may be old: it says nothing about when the device was last heard
                if msg.online:
                    row = replace(row, last_seen=max(row.last_seen or 0.0, min(msg.ts, received)))
            else:
                temps = msg.temperatures_c
                row = replace(
                    row,
                    p50_ms=msg.latency.p50_ms,
                    p95_ms=msg.latency.p95_ms,
                    rss_mb=msg.rss_mb,
                    cpu_percent=msg.cpu_percent,
                    temp_max_c=max(temps.values()) if temps else None,
                    throttled=msg.throttled,
                    last_seen=received,
                )
                if msg.generation is not None and msg.generation.tok_s is not None:
                    row = replace(row, tok_s=msg.generation.tok_s)
                if msg.monitor:
                    w = MonitorWindow.parse(msg.monitor)
                    row = replace(
                        row,
                        drift=w.drift_max,
                        drifting=w.drifting,
                        mean_confidence=w.mean_confidence,
                    )
                if row.model is None and msg.active is not None:
                    row = replace(row, model=msg.active.name, version=msg.active.version)
            if isinstance(msg, Telemetry):
                self.telemetry_from.add(t.device)
            self.rows[t.device] = row

    def start(self) -> LiveFleet:
        self.client.__enter__()
        prefix = f"{topics.PREFIX}/devices/+"
        self._listener = self.client.listen([(f"{prefix}/state", 1), (f"{prefix}/telemetry", 0)])
        return self

    def poll(self) -> None:
        """Fold in what arrived since the last call (the caller's thread does the decoding)."""
        if self._listener is not None:
            for m in self._listener.drain():
                self.apply(m.topic, m.payload, m.received)

    def waiting_for(self) -> list[str]:
        """Online devices that have not sent telemetry yet."""
        self.poll()
        with self._lock:
            return sorted(
                d for d, r in self.rows.items() if r.online and d not in self.telemetry_from
            )

    def snapshot(self) -> list[DeviceRow]:
        self.poll()
        with self._lock:
            return [self.rows[k] for k in sorted(self.rows)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


# ---------------------------------------------------------------- rendering

COLUMNS = (
    "device",
    "status",
    "profile",
    "model",
    "p50",
    "p95",
    "tok/s",
    "RSS",
    "CPU",
    "max temp",
    "throttled",
    "drift",
    "conf",
    "last seen",
)
DRIFT_COLUMN = COLUMNS.index("drift")
THROTTLED_COLUMN = COLUMNS.index("throttled")
DRIFT_MARK = "⚠"  # before the score of a window the agent judged drifting
NUMERIC_COLUMNS = frozenset(
    {"p50", "p95", "tok/s", "RSS", "CPU", "max temp", "drift", "conf"}
)  # right-aligned in table and report


def _num(v: float | None, unit: str, fmt: str = ".1f") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0.0, now - ts)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def shown(rows: list[DeviceRow]) -> list[int]:
    """Indexes of the COLUMNS to show: tok/s only when some device generates text."""
    skip = set() if any(r.tok_s is not None for r in rows) else {COLUMNS.index("tok/s")}
    return [i for i in range(len(COLUMNS)) if i not in skip]


def cells(r: DeviceRow, now: float) -> list[str]:
    """Plain-text cells in COLUMNS order (shared by the terminal table and the HTML report)."""
    status = "online" if r.online else ("offline" if r.online is False else "unknown")
    model = f"{r.model} {r.version}" if r.model else "-"
    throttled = "-" if r.throttled is None else ("yes" if r.throttled else "no")
    return [
        r.device,
        status,
        r.profile or "-",
        model,
        _num(r.p50_ms, " ms", ".2f"),
        _num(r.p95_ms, " ms", ".2f"),
        _num(r.tok_s, ""),
        _num(r.rss_mb, " MB"),
        _num(r.cpu_percent, "%"),
        _num(r.temp_max_c, " °C"),
        throttled,
        drift_cell(r),
        _num(r.mean_confidence, "", ".2f"),
        ago(r.last_seen, now),
    ]


def drift_cell(r: DeviceRow) -> str:
    """The latest window's max drift score, marked when the agent judged it drifting."""
    if r.drift is None:
        return f"{DRIFT_MARK} -" if r.drifting else "-"
    return f"{DRIFT_MARK} {r.drift:.3f}" if r.drifting else f"{r.drift:.3f}"


def render_table(
    rows: list[DeviceRow], now: float | None = None, title: str = "edgefleet fleet"
) -> Any:
    """A rich Table of the rows, online green, offline red, throttled yellow."""
    from rich.table import Table

    now = time.time() if now is None else now
    online = sum(1 for r in rows if r.online)
    t = Table(title=f"{title} — {online}/{len(rows)} online", title_justify="left")
    show = shown(rows)
    for i in show:
        col = COLUMNS[i]
        t.add_column(col, justify="right" if col in NUMERIC_COLUMNS else "left", no_wrap=True)
    for r in rows:
        c = cells(r, now)
        c[1] = {"online": "[green]● online[/green]", "offline": "[red]○ offline[/red]"}.get(
            c[1], c[1]
        )
        if r.throttled:
            c[THROTTLED_COLUMN] = "[bold yellow]yes[/bold yellow]"
        if r.drifting:
            c[DRIFT_COLUMN] = f"[bold red]{c[DRIFT_COLUMN]}[/bold red]"
        t.add_row(*(c[i] for i in show))
    if not rows:
        t.caption = "no devices yet"
    return t


def rows_json(rows: list[DeviceRow]) -> str:
    return json.dumps([r.as_dict() for r in rows], indent=2)
