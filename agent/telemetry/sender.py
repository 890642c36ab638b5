"""Send what an on-disk buffer holds, in order, at least once: the telemetry reporter's and the
sample publisher's delivery (QoS 1, a bounded number in flight, deleted on PUBACK).

Messages handed to the transport before a disconnect are resent by the transport after the
reconnect, so new ones wait until those are acknowledged: delivery stays in order. A message the
transport did not keep across the reconnect (paho drops one whose publish raced the disconnect,
on some versions) is published again from the buffer after RESEND_AFTER_S: receivers drop a
repeated seq.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

from agent.store.space import is_disk_full
from agent.telemetry.buffer import TelemetryBuffer
from agent.transport.base import Delivery, Transport

log = logging.getLogger(__name__)

INFLIGHT = 16
# Seconds after a reconnect before a message still unacknowledged from an earlier connection is
# published again from the buffer.
RESEND_AFTER_S = 5.0


@dataclass
class _Inflight:
    id: int
    delivery: Delivery
    connection: int


class BufferedSender:
    """Mixin: ``pump`` sends ``buffer``'s messages on ``topic``; ``init_sender`` first."""

    t: Transport
    topic: str
    buffer: TelemetryBuffer

    def init_sender(self, transport: Transport, topic: str, buffer: TelemetryBuffer) -> None:
        self.t, self.topic, self.buffer = transport, topic, buffer
        self.inflight: list[_Inflight] = []
        self.sent_upto = 0  # highest buffered id handed to the transport
        # The connection seen with old in-flight messages, and since when.
        self._reconnected, self._reconnected_at = 0, 0.0

    # -- delivery -----------------------------------------------------------------------------
    def pump(self, wait: float = 0.0) -> int:
        """Forget acknowledged messages, send more while connected; returns how many are in flight."""
        done = [f.id for f in self.inflight if f.delivery.acked()]
        if not done and self.inflight and wait > 0 and self.inflight[0].delivery.wait(wait):
            done = [f.id for f in self.inflight if f.delivery.acked()]
        if done:
            try:
                self.buffer.delete(done)
            except (sqlite3.Error, OSError) as exc:
                if not is_disk_full(exc):
                    raise
                # Kept in flight (sent and acknowledged): deleted once the disk has room again.
                return len(self.inflight)
            gone = set(done)
            self.inflight = [f for f in self.inflight if f.id not in gone]
        if not self.t.is_connected():
            return len(self.inflight)
        conn = self.t.connects
        old = [f for f in self.inflight if f.connection != conn]
        if old:
            if self._reconnected != conn:
                self._reconnected, self._reconnected_at = conn, time.monotonic()
            if time.monotonic() - self._reconnected_at < RESEND_AFTER_S:
                return len(self.inflight)  # resent by the transport first; keeps the order
            for f in old:  # not kept by the transport across the reconnect: publish it again
                again = self.buffer.after(f.id - 1, 1)
                if again and again[0][0] == f.id:
                    log.info(
                        "%s %d unacknowledged since a reconnect; publishing it again",
                        self.topic,
                        f.id,
                    )
                    f.delivery, f.connection = self.t.publish_tracked(self.topic, again[0][1]), conn
            return len(self.inflight)
        room = INFLIGHT - len(self.inflight)
        if room > 0:
            for mid, payload in self.buffer.after(self.sent_upto, room):
                self.inflight.append(
                    _Inflight(mid, self.t.publish_tracked(self.topic, payload), conn)
                )
                self.sent_upto = mid
        return len(self.inflight)
