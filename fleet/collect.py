"""The collector: subscribes to every device's state, events, telemetry and command results and
stores them in the fleet database.

Delivery: QoS 1, a persistent session (a stable client id) and manual acks through paho's
public API: paho's network thread only enqueues; a worker decodes a batch (fleet/ingest.py), commits it in one
transaction and only then acknowledges each message. A crash before the commit leaves the
messages unacknowledged, so the broker sends them again; inserts are idempotent (unique
(device, seq)), so a redelivered message is not stored twice. Collectors scale out with an
MQTT shared subscription ($share/GROUP/...): each message goes to one member of the group.

Backpressure: the broker sends a client only so many unacknowledged messages (its
max_inflight_messages; with MQTT 5 our Receive Maximum), and nothing is acknowledged before it
is committed, so a slow database holds the broker back. Should the queue still reach
``max_queued`` (a broker without that limit), paho's thread never waits: the message is left
unacknowledged and not queued, and once the worker has caught up it reconnects, which makes
the broker send every unacknowledged message again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from agent.broker import (
    BrokerConfig,
    ConnectWatch,
    ack_messages,
    connect,
    is_permanent,
    make_client,
    no_delay,
)
from agent.errors import BrokerError, DatabaseError, UsageError
from agent.protocol import topics
from fleet.db import Batch, FleetDB
from fleet.ingest import add_message
from fleet.samples_store import MAX_SAMPLE_BYTES, SampleLimit

log = logging.getLogger("edgefleet.collect")

MAX_QUEUED = 50_000  # received but not yet committed; beyond it messages wait on the broker
SHARE_SILENCE_S = 60.0  # six default telemetry intervals with devices online and nothing shared
LEAVES = ("state", "events", "telemetry", "cmd/result", "samples")


def subscriptions(share_group: str | None) -> list[str]:
    """Topic filters: state is always subscribed directly (it is retained, and brokers do not send
    retained messages to shared subscriptions); the streams go through the share group."""
    out = []
    for leaf in LEAVES:
        f = f"{topics.PREFIX}/devices/+/{leaf}"
        out.append(f"$share/{share_group}/{f}" if share_group and leaf != "state" else f)
    return out


def default_client_id(db_label: str, share_group: str | None) -> str:
    """Stable across restarts of the same collector, so the broker keeps its session."""
    h = hashlib.sha256(f"{db_label}|{share_group or ''}".encode()).hexdigest()[:8]
    return f"edgefleet-collector-{socket.gethostname()[:24]}-{h}"


class ShareWatch:
    """Notices a broker that grants a shared subscription but delivers nothing on it (RabbitMQ
    3.10, amqtt): devices' retained states say they are online, yet after ``silence_s`` not one
    message came through $share. ``warning()`` says so once; it costs a set and a counter."""

    def __init__(self, group: str | None, silence_s: float = SHARE_SILENCE_S) -> None:
        self.group, self.silence_s = group, silence_s
        self.started = time.monotonic()
        self.shared = 0  # messages that came through the shared subscription
        self.online: set[str] = set()
        self.warned = False

    def saw(self, items: list[tuple[str, bytes, int, int, float]], batch: Batch) -> None:
        if self.group is None or self.shared:
            return
        self.shared += sum(1 for t, *_ in items if not t.endswith("/state"))
        for dev, online, *_ in batch.device_states:
            (self.online.add if online else self.online.discard)(dev)

    def warning(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if self.warned or self.group is None or self.shared or not self.online:
            return None
        if now - self.started < self.silence_s:
            return None
        self.warned = True
        sub = subscriptions(self.group)[1]
        return (
            f"no message arrived on {sub} (or the other shared topics) in {self.silence_s:g}s "
            f"although {len(self.online)} device(s) are online; this broker may not support "
            f"shared subscriptions: edgefleet broker check"
        )


@dataclass
class Stats:
    received: int = 0
    stored: int = 0  # new rows committed (duplicates excluded)
    duplicates: int = 0  # redelivered or already stored by another collector
    rejected: int = 0
    batches: int = 0
    connects: int = 0
    deferred: int = 0  # left unacknowledged while the queue was full; the broker sends them again
    samples_oversize: int = 0  # captured samples refused for their size (also in rejected)
    first_received: float | None = None
    last_commit: float | None = None
    error: str | None = None
    by_table: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Collector:
    """Broker -> database. ``start()`` connects (bounded retries), ``stop()`` flushes and disconnects."""

    def __init__(
        self,
        broker: BrokerConfig,
        db: FleetDB | str,
        share_group: str | None = None,
        client_id: str | None = None,
        batch_max: int = 5000,
        connect_attempts: int = 4,
        max_queued: int = MAX_QUEUED,
        share_silence_s: float = SHARE_SILENCE_S,
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
    ) -> None:
        self.broker = broker
        self.db = db if isinstance(db, FleetDB) else FleetDB(db)
        if share_group is not None and not topics.SEGMENT_RE.match(share_group):
            raise UsageError(f"--share-group {share_group!r}: letters, digits, '.', '_' or '-'")
        self.share_group = share_group
        self.client_id = client_id or default_client_id(self.db.label, share_group)
        self.batch_max, self.connect_attempts, self.max_queued = (
            batch_max,
            connect_attempts,
            max_queued,
        )
        self.stats = Stats()
        self.samples = SampleLimit(max_sample_bytes)
        self.share = ShareWatch(share_group, share_silence_s)
        self.q: queue.SimpleQueue[tuple[str, bytes, int, int, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._connected = threading.Event()
        # SUBACK of the first connection's subscriptions: start() returns once the broker
        # routes the topics here (returning at CONNACK lost what was published right after).
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._overflow = threading.Event()
        self._refused: str | None = None
        self._worker: threading.Thread | None = None
        self.c = make_client(
            broker, self.client_id, persistent=True, manual_ack=True, max_inflight=1000
        )
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        # why connecting fails; once running, reconnect failures are logged (once per cause)
        self._watch = ConnectWatch(broker)
        self._watch.install(self.c)

    # -- paho callbacks (network thread): enqueue only, never wait --------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        refused = self._watch.connack(rc)
        if refused is not None:
            self._refused = refused
            self._connected.set()
            return
        no_delay(client)
        self.stats.connects += 1
        _, self._sub_mid = client.subscribe([(f, 1) for f in subscriptions(self.share_group)])
        self._connected.set()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        if mid != self._sub_mid:
            return
        refused = [str(c) for c in codes if getattr(c, "is_failure", False)]
        if refused:  # e.g. an ACL that does not let this identity read a topic
            log.warning(
                "broker refused %d of the collector's subscriptions: %s", len(refused), refused
            )
        self._subscribed.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        lost = self._watch.disconnected()  # closed before a CONNACK: a TLS or login failure
        if lost is not None and not self._connected.is_set():
            self._refused = lost
            self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0 and self.q.qsize() >= self.max_queued:
            # not acked: the broker keeps it and sends it again after the worker's reconnect
            self.stats.deferred += 1
            self._overflow.set()
            return
        self.q.put((msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.time()))

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Collector:
        last = ""
        for attempt in range(self.connect_attempts):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
            try:
                connect(self.c, self.broker, persistent=True, receive_maximum=self.max_queued)
                break
            except OSError as exc:
                last = self._watch.failed(exc)
                if is_permanent(exc):
                    raise BrokerError(f"cannot connect to {self.broker.url}: {last}") from None
        else:
            raise BrokerError(
                f"cannot connect to {self.broker.url} after {self.connect_attempts} "
                f"attempts: {last}"
            )
        self.c.loop_start()
        wait_s = 15.0
        if not self._connected.wait(wait_s):
            self.c.loop_stop()
            raise BrokerError(f"{self.broker.url}: no answer within {wait_s:g}s")
        if self._refused:
            self.c.loop_stop()
            raise BrokerError(f"cannot connect to {self.broker.url}: {self._refused}")
        if not self._subscribed.wait(wait_s):
            self.c.loop_stop()
            raise BrokerError(
                f"{self.broker.url}: subscriptions not acknowledged within {wait_s:g}s"
            )
        self._watch.log = log
        self.share.started = time.monotonic()
        self._worker = threading.Thread(target=self._run, name="collector-db", daemon=True)
        self._worker.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Store and acknowledge what was received, then disconnect (the session stays on the broker)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()
        # Anything that arrived during the disconnect is stored but cannot be acked any more: the
        # broker sends it again next time and the unique keys drop the copy.
        if self.stats.error is None:
            with contextlib.suppress(DatabaseError):
                while self._flush(ack=False):
                    pass
        self.db.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker ends (stop() or a database error). True if it ended."""
        return self._done.wait(timeout)

    @property
    def failed(self) -> str | None:
        return self.stats.error

    def _resync(self) -> None:
        """After an overflow (worker thread, queue drained): reconnect, so that the broker sends
        again what was left unacknowledged. paho's thread is stopped first, so only this thread
        touches the connection; the persistent session keeps subscriptions and messages."""
        self._overflow.clear()
        log.info(
            "caught up after %d deferred messages; reconnecting to receive them again",
            self.stats.deferred,
        )
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()
        self._connected.clear()
        try:
            self.c.reconnect()
        except OSError as exc:
            log.warning("reconnect after an overflow failed (%s); paho keeps trying", exc)
        self.c.loop_start()

    # -- worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                n = self._flush(ack=True, wait=0.2)
                if self._overflow.is_set() and n < self.batch_max and self.q.qsize() == 0:
                    self._resync()
            # stopping: what was received until now, even if more keeps arriving
            for _ in range(self.q.qsize() // self.batch_max + 1):
                if not self._flush(ack=True):
                    break
        except DatabaseError as exc:
            self.stats.error = str(exc)
            log.error("%s", exc)
        finally:
            self._done.set()

    def _flush(self, ack: bool, wait: float = 0.0) -> int:
        items: list[tuple[str, bytes, int, int, float]] = []
        try:
            items.append(self.q.get(timeout=wait) if wait > 0 else self.q.get_nowait())
            while len(items) < self.batch_max:
                items.append(self.q.get_nowait())
        except queue.Empty:
            pass
        if not items:
            return 0
        batch = Batch.empty()
        rejected = 0
        for topic, payload, _mid, _qos, received in items:
            if not add_message(batch, topic, payload, received, self.samples):
                rejected += 1
        new = self.db.store(batch)
        self.share.saw(items, batch)
        s = self.stats
        s.received += len(items)
        s.rejected += rejected
        s.stored += new
        s.duplicates += len(items) - rejected - new
        s.batches += 1
        s.samples_oversize = self.samples.refused
        s.last_commit = time.time()
        if s.first_received is None:
            s.first_received = items[0][4]
        for table, rows in batch.rows.items():
            if rows:
                s.by_table[table] = s.by_table.get(table, 0) + len(rows)
        if ack:
            # public manual-ack API: one PUBACK per QoS 1 message, queued once its batch is committed
            ack_messages(self.c, ((mid, qos) for _t, _p, mid, qos, _r in items))
        return len(items)
