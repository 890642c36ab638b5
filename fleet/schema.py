"""The fleet database's schema: one definition of every table (``TABLES``) and the SQL made from
it for either dialect (SQLite, PostgreSQL): the CREATE statements and the idempotent inserts.
Every message table has a unique key (device, seq) and inserts are ``ON CONFLICT DO NOTHING``,
so a QoS 1 redelivery or a second collector never stores a row twice.
"""

from __future__ import annotations

from dataclasses import dataclass

# 1: the first schema. 2: + monitor (per-window model monitoring). 3: + samples (feedback
# capture). 4: + generation (text-generation windows). An older database gains new tables
# through CREATE TABLE IF NOT EXISTS at the collector's next start; nothing is rewritten.
SCHEMA_VERSION = 4


# Column kinds map to one SQL type per dialect.
_TYPES = {
    "sqlite": {
        "text": "TEXT",
        "int": "INTEGER",
        "float": "REAL",
        "bool": "INTEGER",
        "json": "TEXT",
        "serial": "INTEGER PRIMARY KEY",
    },
    "postgres": {
        "text": "TEXT",
        "int": "BIGINT",
        "float": "DOUBLE PRECISION",
        "bool": "BOOLEAN",
        "json": "TEXT",
        "serial": "BIGSERIAL PRIMARY KEY",
    },
}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, kind)
    key: tuple[str, ...]  # unique key: the conflict target
    indexes: tuple[tuple[str, ...], ...] = ()

    @property
    def names(self) -> list[str]:
        return [c for c, kind in self.columns if kind != "serial"]


_MSG = (("device", "text"), ("seq", "int"), ("ts", "float"), ("received", "float"))
_MODEL = (("model", "text"), ("version", "text"), ("sha256", "text"))

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "devices",
            (
                ("device", "text"),
                ("online", "bool"),
                ("profile", "text"),
                ("agent_version", "text"),
                ("groups", "json"),
                *_MODEL,
                ("state_seq", "int"),
                ("state_ts", "float"),
                ("last_seen", "float"),
            ),
            ("device",),
        ),
        Table(
            "states",
            (
                *_MSG,
                ("online", "bool"),
                ("profile", "text"),
                ("agent_version", "text"),
                ("groups", "json"),
                *_MODEL,
            ),
            ("device", "seq"),
        ),
        Table(
            "events",
            (
                *_MSG,
                ("kind", "text"),
                ("state", "text"),
                ("name", "text"),
                ("version", "text"),
                ("sha256", "text"),
                ("reason", "text"),
                ("detail", "json"),
            ),
            ("device", "seq"),
            (("ts",),),
        ),
        Table(
            "telemetry",
            (
                *_MSG,
                ("interval_s", "float"),
                ("uptime_s", "float"),
                *_MODEL,
                ("count", "int"),
                ("errors", "int"),
                ("throughput_per_s", "float"),
                ("p50_ms", "float"),
                ("p95_ms", "float"),
                ("p99_ms", "float"),
                ("max_ms", "float"),
                ("rss_mb", "float"),
                ("cpu_percent", "float"),
                ("mem_available_mb", "float"),
                ("temp_max_c", "float"),
                ("temperatures", "json"),
                ("throttled", "bool"),
                ("cpu_freq_mhz", "float"),
                ("buffer_pending", "int"),
                ("buffer_dropped", "int"),
            ),
            ("device", "seq"),
            (("ts",),),
        ),
        Table(
            "monitor",  # the `monitor` block of a telemetry message, when the device sends one
            (
                *_MSG,
                *_MODEL,
                ("count", "int"),
                ("metric", "text"),
                ("drift_max", "float"),
                ("mean_confidence", "float"),
                ("low_confidence_rate", "float"),
                ("non_finite", "int"),
                ("drifting", "bool"),
                ("block", "json"),
            ),
            ("device", "seq"),
            (("ts",),),
        ),
        Table(
            "generation",  # the `generation` block of a telemetry message (fleet/gen_store.py)
            (
                *_MSG,
                *_MODEL,
                ("requests", "int"),
                ("tokens", "int"),
                ("tok_s", "float"),
                ("ttft_p50_ms", "float"),
                ("ttft_p95_ms", "float"),
                ("queue_max", "int"),
                ("rejected", "int"),
                ("errors", "int"),
                ("cancelled", "int"),
            ),
            ("device", "seq"),
            (("ts",),),
        ),
        Table(
            "samples",  # captured inferences (fleet/samples_store.py); tensors as their JSON
            (
                *_MSG,
                *_MODEL,
                ("trigger", "text"),
                ("request_id", "text"),
                ("label", "json"),
                ("redacted", "bool"),
                ("size", "int"),
                ("inputs", "json"),
                ("outputs", "json"),
            ),
            ("device", "seq"),
            (("model", "version"),),
        ),
        Table(
            "cmd_results",
            (
                ("device", "text"),
                ("cmd_id", "text"),
                ("received", "float"),
                ("ok", "bool"),
                ("reason", "text"),
                ("detail", "json"),
            ),
            ("device", "cmd_id"),
        ),
        Table(
            "rejected",
            (
                ("id", "serial"),
                ("received", "float"),
                ("topic", "text"),
                ("reason", "text"),
                ("size", "int"),
                ("payload_prefix", "text"),
            ),
            (),
        ),
    )
}
MESSAGE_TABLES = (
    "states",
    "events",
    "telemetry",
    "monitor",
    "generation",
    "samples",
    "cmd_results",
)


def ddl(dialect: str) -> list[str]:
    """CREATE statements for every table and index in ``dialect`` ('sqlite' or 'postgres')."""
    types = _TYPES[dialect]
    out = ["CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)"]
    for t in TABLES.values():
        cols = [f"{name} {types[kind]}" for name, kind in t.columns]
        if t.key:
            cols.append(f"PRIMARY KEY ({', '.join(t.key)})")
        out.append(f"CREATE TABLE IF NOT EXISTS {t.name} ({', '.join(cols)})")
        for idx in t.indexes:
            out.append(
                f"CREATE INDEX IF NOT EXISTS {t.name}_{'_'.join(idx)} ON {t.name} ({', '.join(idx)})"
            )
    return out


def insert_sql(table: str, ph: str) -> str:
    """INSERT that skips a row whose unique key is already there (idempotent under redelivery)."""
    t = TABLES[table]
    cols = t.names
    conflict = " ON CONFLICT DO NOTHING" if t.key else ""
    return (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([ph] * len(cols))}){conflict}"
    )


def device_state_sql(ph: str) -> str:
    """Upsert a device's current state: the latest to arrive (not the highest seq); last_seen
    only moves forward."""
    cols = [c for c in TABLES["devices"].names]
    sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in ("device", "last_seen"))
    return (
        f"INSERT INTO devices ({', '.join(cols)}) VALUES ({', '.join([ph] * len(cols))}) "
        f"ON CONFLICT (device) DO UPDATE SET {sets}, last_seen = {_later('last_seen')}"
    )


def _later(col: str) -> str:
    return (
        f"CASE WHEN devices.{col} IS NULL OR excluded.{col} > devices.{col} "
        f"THEN excluded.{col} ELSE devices.{col} END"
    )


def seen_sql(ph: str) -> str:
    """Record when a device was last heard from; last_seen only moves forward."""
    return (
        f"INSERT INTO devices (device, last_seen) VALUES ({ph}, {ph}) "
        f"ON CONFLICT (device) DO UPDATE SET last_seen = {_later('last_seen')}"
    )


def columns(table: str) -> list[str]:
    return TABLES[table].names
