"""The fleet database: a connection in either dialect (SQLite by default, PostgreSQL for large
fleets) that creates the schema (fleet/schema.py), writes a collector's batch in one
transaction and answers the views' queries.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import DatabaseError, UsageError, missing_dependency
from fleet.schema import (
    MESSAGE_TABLES,
    SCHEMA_VERSION,
    TABLES,
    ddl,
    device_state_sql,
    insert_sql,
    seen_sql,
)


@dataclass
class Batch:
    """Rows decoded from a batch of messages, written in one transaction."""

    rows: dict[str, list[tuple[Any, ...]]]
    device_states: list[tuple[Any, ...]]
    seen: dict[str, float]

    @classmethod
    def empty(cls) -> Batch:
        return cls({t: [] for t in (*MESSAGE_TABLES, "rejected")}, [], {})

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values())


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class FleetDB:
    """A connection to the fleet database in either dialect; ``?`` placeholders in queries."""

    def __init__(self, target: str, readonly: bool = False) -> None:
        self.target, self.readonly = target, readonly
        self._lock = threading.Lock()
        if is_postgres(target):
            self.dialect, self.ph = "postgres", "%s"
            self.conn: Any = self._open_pg(target)
        elif "://" in target and not target.startswith("sqlite:///"):
            scheme = target.split("://", 1)[0]
            raise UsageError(
                f"--db {target}: unknown database scheme '{scheme}://' "
                "(use a file path, sqlite:///PATH or postgresql://...)"
            )
        else:
            self.dialect, self.ph = "sqlite", "?"
            self.conn = self._open_sqlite(Path(target.removeprefix("sqlite://")), readonly)
        if not readonly:
            self.init_schema()

    @property
    def label(self) -> str:
        """The target without a password, for messages."""
        if self.dialect == "postgres" and "@" in self.target:
            scheme, rest = self.target.split("://", 1)
            return f"{scheme}://…@{rest.rsplit('@', 1)[1]}"
        return self.target

    @staticmethod
    def _open_sqlite(path: Path, readonly: bool) -> sqlite3.Connection:
        if readonly and not path.is_file():
            raise UsageError(
                f"--db {path}: no such database (start `edgefleet collect --db {path}` first)"
            )
        if not path.parent.is_dir():
            raise DatabaseError(f"--db {path}: directory {path.parent} does not exist")
        try:
            uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")  # readers never block the collector
                conn.execute(
                    "PRAGMA synchronous=NORMAL"
                )  # durable at checkpoints; no fsync per batch
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise DatabaseError(f"--db {path}: cannot open database ({exc})") from None
        return conn

    @staticmethod
    def _open_pg(target: str) -> Any:
        try:
            import psycopg
        except ImportError:
            raise missing_dependency("psycopg", "postgres", "a postgresql:// database") from None
        try:
            return psycopg.connect(target, connect_timeout=10)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseError(f"cannot connect to PostgreSQL: {first}") from None

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.dialect == "postgres":
            import psycopg

            return (psycopg.Error,)
        return (sqlite3.Error,)

    def init_schema(self) -> None:
        try:
            with self._lock:
                cur = self.conn.cursor()
                for stmt in ddl(self.dialect):
                    cur.execute(stmt)
                cur.execute(
                    f"INSERT INTO meta (key, value) VALUES ({self.ph}, {self.ph}) ON CONFLICT DO NOTHING",
                    ("schema_version", str(SCHEMA_VERSION)),
                )
                # an older database has just gained the newer tables: record that it is current
                cur.execute(
                    f"UPDATE meta SET value = {self.ph} WHERE key = 'schema_version' "
                    f"AND CAST(value AS INTEGER) < {self.ph}",
                    (str(SCHEMA_VERSION), SCHEMA_VERSION),
                )
                self.conn.commit()
        except self._errors() as exc:
            self._rollback()
            raise DatabaseError(
                f"--db {self.label}: cannot write the schema ({_first_line(exc)})"
            ) from None

    def _rollback(self) -> None:
        with contextlib.suppress(
            Exception
        ):  # the connection may be gone; the first error is reported
            self.conn.rollback()

    def store(self, batch: Batch) -> int:
        """Write a batch in one transaction; returns how many messages were new (duplicates skipped)."""
        new = 0
        try:
            with self._lock:
                cur = self.conn.cursor()
                for table, rows in batch.rows.items():
                    if rows:
                        cur.executemany(insert_sql(table, self.ph), rows)
                        # counted per message: these rows ride on a telemetry message
                        if table not in ("rejected", "monitor", "generation"):
                            new += max(cur.rowcount, 0)
                if batch.device_states:
                    cur.executemany(device_state_sql(self.ph), batch.device_states)
                if batch.seen:
                    cur.executemany(seen_sql(self.ph), sorted(batch.seen.items()))
                self.conn.commit()
        except self._errors() as exc:
            self._rollback()
            raise DatabaseError(f"--db {self.label}: write failed ({_first_line(exc)})") from None
        return new

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts; ``sql`` uses ``?`` placeholders in both dialects."""
        if self.dialect == "postgres":
            sql = sql.replace("?", "%s")
        try:
            with self._lock:
                cur = self.conn.cursor()
                cur.execute(sql, tuple(params))
                names = [d[0] for d in cur.description or ()]
                rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
                if self.dialect == "postgres":
                    self.conn.commit()  # end the read transaction so later reads see new rows
                return rows
        except self._errors() as exc:
            self._rollback()
            raise DatabaseError(f"--db {self.label}: query failed ({_first_line(exc)})") from None

    def has_table(self, table: str) -> bool:
        """Whether ``table`` exists: a reader opening an older database read-only (which the
        collector has not upgraded yet) lacks the newer tables."""
        if self.dialect == "postgres":
            sql = (
                "SELECT 1 AS x FROM information_schema.tables "
                "WHERE table_name = ? AND table_schema = current_schema()"
            )
        else:
            sql = "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = ?"
        return bool(self.query(sql, (table,)))

    def schema_version(self) -> int:
        rows = self.query("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0]["value"]) if rows else 0

    def delete(self, table: str, where: str, params: Sequence[Any] = ()) -> int:
        """Delete ``table``'s rows matching ``where`` (``?`` placeholders); how many went."""
        if self.readonly:
            raise DatabaseError(f"--db {self.label}: opened read-only")
        sql = f"DELETE FROM {TABLES[table].name} WHERE {where}"
        if self.dialect == "postgres":
            sql = sql.replace("?", "%s")
        try:
            with self._lock:
                cur = self.conn.cursor()
                cur.execute(sql, tuple(params))
                n = max(int(cur.rowcount), 0)
                self.conn.commit()
                return n
        except self._errors() as exc:
            self._rollback()
            raise DatabaseError(f"--db {self.label}: delete failed ({_first_line(exc)})") from None

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT COUNT(*) AS n FROM {TABLES[table].name}")[0]["n"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_db(target: str, readonly: bool = False) -> FleetDB:
    return FleetDB(target, readonly)
