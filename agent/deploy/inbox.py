"""The agent's inbox: the bounded queue between the transport's callbacks and its worker.

The transport's threads only enqueue here (``put_message``, ``put_connect``); the worker takes
items with ``get`` and answers "busy" with ``answer_busy``. A flood is dropped and counted, not
buffered: the queue is bounded in items and bytes, and operator commands in how many wait
([commands] max_pending). A command refused as busy still gets its answer, from the worker.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

from agent.config import CommandsConfig
from agent.deploy import commands
from agent.protocol import topics
from agent.transport.base import Transport

QUEUE_MAX = 10_000
# Bytes waiting in the queue: a flood of large messages is dropped (and counted), not buffered.
QUEUE_MAX_BYTES = 64 * 1024 * 1024
# Ids of commands refused as busy that wait for their answer; beyond it they are counted only.
BUSY_ANSWERS_MAX = 1024

# (kind, topic, payload); kind is "msg", "cmd" (this device's commands) or "connect".
Item = tuple[str, str, bytes]


class Inbox:
    """Queued messages and connects; counts what it drops and what it refuses as busy."""

    def __init__(self, dev: str, cfg: CommandsConfig, transport: Transport) -> None:
        self.cfg, self.t = cfg, transport
        self.q: queue.Queue[Item] = queue.Queue(QUEUE_MAX)
        self._queued_bytes = 0
        self._qlock = threading.Lock()
        self.dropped = 0
        # Commands queued and not yet handled ([commands] max_pending bounds them); those refused
        # meanwhile wait here, as (id, pending), for the worker to answer "busy".
        self._cmd_topic = topics.device_topic(dev, "cmd")
        self._result_topic = topics.device_topic(dev, "cmd/result")
        self.pending_commands = 0
        self.refused_busy = 0
        self._busy: deque[tuple[str, int]] = deque()

    # -- transport callbacks: enqueue only ------------------------------------------------------
    def put_message(self, topic: str, payload: bytes, retain: bool) -> None:
        is_cmd = topic == self._cmd_topic
        with self._qlock:
            if is_cmd and self.pending_commands >= self.cfg.max_pending:
                self._refuse_busy(payload)
                return
            full = self._queued_bytes + len(payload) > QUEUE_MAX_BYTES
            if not full:
                try:
                    self.q.put_nowait(("cmd" if is_cmd else "msg", topic, payload))
                except queue.Full:
                    full = True
            if full:  # a flood: dropped and counted; a command still gets its answer
                if is_cmd:
                    self._refuse_busy(payload)
                else:
                    self.dropped += 1
                return
            self._queued_bytes += len(payload)
            if is_cmd:
                self.pending_commands += 1

    def put_connect(self) -> None:
        self.q.put(("connect", "", b""))

    def _refuse_busy(self, payload: bytes) -> None:
        """A command beyond the queue (transport thread, under ``_qlock``): its id waits for the
        worker to answer "busy". The transport contract is that callbacks only enqueue, so the
        answer is not published from here; the worker sends it at its next step or benchmark run.
        A command whose id cannot be read, or beyond BUSY_ANSWERS_MAX, is counted as dropped."""
        cid = commands.command_id(payload) if len(payload) <= commands.BUSY_ID_MAX_BYTES else None
        if cid is None or len(self._busy) >= BUSY_ANSWERS_MAX:
            self.dropped += 1
            return
        self._busy.append((cid, self.pending_commands))

    # -- the worker's side ----------------------------------------------------------------------
    def get(self, timeout: float = 0.0) -> Item | None:
        """The next item (waiting up to ``timeout``), no longer counted as queued; None if none."""
        try:
            item = self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait()
        except queue.Empty:
            return None
        kind, _, payload = item
        with self._qlock:
            self._queued_bytes -= len(payload)
            if kind == "cmd":
                self.pending_commands -= 1
        return item

    def answer_busy(self) -> None:
        """Answer the commands refused as busy since the last call (worker thread)."""
        if not self._busy:
            return
        with self._qlock:
            refused, self._busy = self._busy, deque()
        self.refused_busy += len(refused)
        for cid, pending in refused:
            self.t.publish(self._result_topic, commands.busy_result(cid, pending))
