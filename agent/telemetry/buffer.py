"""Undelivered telemetry on disk (SQLite, WAL): written first, deleted once the broker acked it.

SQLite's journal makes every append and delete atomic, so a crash (SIGKILL, power loss) leaves
the buffer as of some recent commit, never torn. Beyond ``max_messages`` the oldest messages are
dropped first; how many is kept (in the same database) so the next message can report it. A
write refused by a full disk raises (sqlite3.OperationalError, SQLITE_FULL): the reporter counts
that message as dropped in memory and hands the count to the next ``reserve`` that succeeds. The
sequence number of telemetry messages lives here too, so it keeps increasing across restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from agent.store.space import is_disk_full

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Reservation:
    """What the next message reports: its seq, drops since the last report and in all, backlog."""

    seq: int
    dropped: int
    dropped_total: int
    pending: int


class TelemetryBuffer:
    def __init__(
        self,
        directory: Path,
        max_messages: int,
        max_bytes: int | None = None,
        name: str = "telemetry.sqlite",
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        # Beyond max_messages, or max_bytes of payloads (the sample queue), the oldest go first.
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self._open()
        except sqlite3.Error as exc:
            # A start on a full disk (SQLite cannot create its WAL index): the agent serves all
            # the same; every write tries to open it again, and until then counts as dropped.
            if not is_disk_full(exc):
                raise
            log.warning("telemetry buffer %s cannot be opened yet: %s", self.path, exc)

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(SCHEMA)
            except BaseException:
                db.close()
                raise
            self._conn = db
        return self._conn

    @property
    def _db(self) -> sqlite3.Connection:
        return self._open()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def reserve(self, unbuffered: int = 0) -> Reservation:
        """Take the next seq and the drop count to report (which then starts again from 0);
        ``unbuffered``: messages dropped because they could not be written (a full disk), added
        to both counts."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._counter("seq") + 1
            dropped = self._counter("dropped") + unbuffered
            self._set("seq", seq)
            self._set("dropped", 0)
            total = self._counter("dropped_total") + unbuffered
            self._set("dropped_total", total)
            pending = self._pending()
        return Reservation(seq, dropped, total, pending)

    def add_dropped(self, unbuffered: int, unreported: int = 0) -> None:
        """Record drop counts kept in memory (a reporter stopping): ``unbuffered`` new drops,
        ``unreported`` already in the total but not yet reported."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._set("dropped", self._counter("dropped") + unbuffered + unreported)
            self._set("dropped_total", self._counter("dropped_total") + unbuffered)

    def append(self, payload: bytes, keep: Collection[int] = ()) -> int:
        """Store ``payload``; drop the oldest messages (except ``keep``: in flight) beyond the bound."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("INSERT INTO messages(payload) VALUES(?)", (payload,))
            new_id = int(cur.lastrowid or 0)
            excess = self._pending() - self.max_messages
            if self.max_bytes is not None:
                excess = max(excess, self._over_bytes(new_id))
            if excess > 0:
                marks = ",".join("?" * len(keep))
                where = f"WHERE id NOT IN ({marks}) AND id != ?" if keep else "WHERE id != ?"
                ids = [
                    r[0]
                    for r in self._db.execute(
                        f"SELECT id FROM messages {where} ORDER BY id LIMIT ?",
                        (*keep, new_id, excess),
                    )
                ]
                self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
                self._set("dropped", self._counter("dropped") + len(ids))
                self._set("dropped_total", self._counter("dropped_total") + len(ids))
        return new_id

    def _over_bytes(self, new_id: int) -> int:
        """How many of the oldest messages to drop so the payloads fit in ``max_bytes``."""
        assert self.max_bytes is not None
        over = self._bytes() - self.max_bytes
        if over <= 0:
            return 0
        n = 0
        for (size,) in self._db.execute(
            "SELECT LENGTH(payload) FROM messages WHERE id != ? ORDER BY id", (new_id,)
        ):
            n, over = n + 1, over - int(size)
            if over <= 0:
                break
        return n

    def _bytes(self) -> int:
        return int(
            self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()[0]
        )

    def pending_bytes(self) -> int:
        with self._lock:
            return 0 if self._conn is None else self._bytes()

    def after(self, last_id: int, limit: int) -> list[tuple[int, bytes]]:
        """Messages with an id above ``last_id``, oldest first (none while it cannot be opened)."""
        with self._lock:
            if self._conn is None:
                return []
            rows = self._db.execute(
                "SELECT id, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
        return [(int(i), bytes(p)) for i, p in rows]

    def delete(self, ids: Collection[int]) -> None:
        if not ids:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])

    def _pending(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def pending(self) -> int:
        with self._lock:
            return 0 if self._conn is None else self._pending()
