"""A small synchronous MQTT client for workstation commands (publish, deploy, device, views).

Built on the shared factory (agent.broker). paho's thread only enqueues: what a command
subscribes to arrives in a ``Listener`` (a queue) that the command reads in its own thread.
Subscriptions are renewed in on_connect, so a reconnect keeps them.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from agent.broker import BrokerConfig, ConnectWatch, is_permanent, make_client, no_delay
from agent.broker import connect as broker_connect
from agent.errors import BrokerError, UsageError

LISTEN_QUEUE = 100_000  # messages a listener holds before new ones are dropped (and counted)


def broker_config(
    url: str,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> BrokerConfig:
    """A BrokerConfig from --broker and its TLS/login options; a bad value is a usage error."""
    try:
        return BrokerConfig(
            url=url,
            ca_file=Path(ca_file) if ca_file else None,
            cert_file=Path(cert_file) if cert_file else None,
            key_file=Path(key_file) if key_file else None,
            username=username,
            password=password,
        )
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise UsageError(f"--broker {url}: {where}: {e['msg']}") from None


class BrokerRefused(BrokerError):
    """The broker refused us (TLS or login): retrying will not help."""


class Message(NamedTuple):
    topic: str
    payload: bytes
    received: float  # time.time() when paho handed it over
    qos: int = 0  # the QoS the broker delivered it at


def shared_filter(f: str) -> str:
    """The topic filter under a shared subscription: ``$share/G/a/+`` matches what ``a/+`` does."""
    return f.split("/", 2)[2] if f.startswith("$share/") and f.count("/") >= 2 else f


class Listener:
    """Messages on some topic filters, queued by paho's thread for the caller to read."""

    def __init__(self, filters: list[tuple[str, int]]) -> None:
        self.filters = filters
        self.q: queue.Queue[Message] = queue.Queue(LISTEN_QUEUE)
        self.dropped = 0
        self.subscribed = threading.Event()

    def matches(self, topic: str) -> bool:
        return any(mqtt.topic_matches_sub(shared_filter(f), topic) for f, _q in self.filters)

    def put(self, topic: str, payload: bytes, qos: int = 0) -> None:
        try:
            self.q.put_nowait(Message(topic, payload, time.time(), qos))
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float) -> Message | None:
        """The next message, waiting up to ``timeout`` s; None if none came."""
        try:
            return self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait()
        except queue.Empty:
            return None

    def drain(self) -> list[Message]:
        out = []
        while (item := self.get(0)) is not None:
            out.append(item)
        return out


class SyncClient:
    """Connects (blocking, with a timeout), publishes QoS 1 with a bounded window of unacked
    messages, reads retained messages, and hands subscribed messages to Listeners.

    ``will`` (topic, payload) is a Last Will the broker publishes (QoS 1, not retained) if this
    client goes away without a DISCONNECT, as ``drop()`` does.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str = "",
        timeout: float = 10.0,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.cfg, self.timeout = cfg, timeout
        self._c = make_client(cfg, client_id, max_inflight=64)
        if will is not None:
            self._c.will_set(will[0], will[1], qos=1, retain=False)
        self._connected = threading.Event()
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._suback: dict[int, Listener] = {}
        self._early_subacks: set[int] = set()
        self._pending: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
        self._c.on_connect = self._on_connect
        self._c.on_message = self._on_message
        self._c.on_subscribe = self._on_subscribe
        self._c.on_disconnect = self._on_disconnect
        self._watch = ConnectWatch(cfg)
        self._watch.install(self._c)

    # -- paho callbacks (network thread): bookkeeping and enqueueing only ----------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        refused = self._watch.connack(rc)
        if refused is not None:
            self._refused = refused
            self._connected.set()
            return
        no_delay(client)
        with self._lock:
            listeners = list(self._listeners)
        for li in listeners:  # a reconnect renews every subscription
            self._subscribe(li)
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        lost = self._watch.disconnected()  # closed before a CONNACK: a TLS or login failure
        if lost is not None and not self._connected.is_set():
            self._refused = lost
            self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            listeners = [li for li in self._listeners if li.matches(msg.topic)]
        for li in listeners:
            li.put(msg.topic, bytes(msg.payload), msg.qos)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        with self._lock:
            li = self._suback.pop(mid, None)
            if li is None:
                self._early_subacks.add(mid)  # the SUBACK beat _subscribe's bookkeeping
        if li is not None:
            li.subscribed.set()

    def _subscribe(self, li: Listener) -> None:
        # not under self._lock: paho may hold its callback lock while it calls _on_message
        rc, mid = self._c.subscribe(li.filters)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return
        with self._lock:
            early = mid in self._early_subacks
            self._early_subacks.discard(mid)
            if not early:
                self._suback[mid] = li
        if early:
            li.subscribed.set()

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> SyncClient:
        try:
            broker_connect(self._c, self.cfg)
        except OSError as exc:
            kind = BrokerRefused if is_permanent(exc) else BrokerError
            raise kind(f"cannot connect to {self.cfg.url}: {self._watch.failed(exc)}") from None
        self._c.loop_start()
        if not self._connected.wait(self.timeout):
            self.close()
            raise BrokerError(f"{self.cfg.url}: no answer within {self.timeout:g}s")
        if self._refused:
            self.close()
            raise BrokerRefused(f"cannot connect to {self.cfg.url}: {self._refused}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._c.disconnect()
        self._c.loop_stop()

    def drop(self) -> None:
        """Close the connection without a DISCONNECT, as a device losing power would: the broker
        then publishes this client's Last Will."""
        self._c.loop_stop()  # paho's thread no longer touches the socket (nor reconnects)
        sock = self._c.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    # -- subscribing ----------------------------------------------------------------------------
    def listen(self, filters: list[tuple[str, int]], wait: bool = False) -> Listener:
        """Subscribe to ``filters`` (kept across reconnects); messages arrive in the Listener.

        ``wait`` blocks until the broker acknowledged the subscription, so nothing published
        afterwards can be missed.
        """
        li = Listener(filters)
        with self._lock:
            self._listeners.append(li)
        self._subscribe(li)
        if wait and not li.subscribed.wait(self.timeout):
            self.unlisten(li)
            raise BrokerError(f"{self.cfg.url}: subscription to {filters[0][0]} not acknowledged")
        return li

    def unlisten(self, li: Listener) -> None:
        with self._lock:
            if li in self._listeners:
                self._listeners.remove(li)
            others = {f for other in self._listeners for f, _q in other.filters}
        gone = [f for f, _q in li.filters if f not in others]
        if gone:
            self._c.unsubscribe(gone)

    def retained_one(self, topic: str, limit: float = 5.0) -> bytes | None:
        """The retained message on one exact ``topic``, waiting for it up to ``limit`` s; None if none came."""
        li = self.listen([(topic, 1)])
        try:
            item = li.get(limit)
            return (item.payload or None) if item is not None else None
        finally:
            self.unlisten(li)

    def retained(self, pattern: str, quiet: float = 0.5, limit: float = 3.0) -> dict[str, bytes]:
        """Retained messages matching ``pattern``: wait until none arrived for ``quiet`` s."""
        li = self.listen([(pattern, 1)])
        got: dict[str, bytes] = {}
        end = time.monotonic() + limit
        try:
            while (left := end - time.monotonic()) > 0:
                item = li.get(min(quiet, left))
                if item is None:
                    break
                got[item.topic] = item.payload
        finally:
            self.unlisten(li)
        return {t: p for t, p in got.items() if p}

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool = True, window: int = 32) -> None:
        """QoS 1; waits for acks so that at most ``window`` messages are unacknowledged."""
        info = self._c.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self._pending.append(info)
        while len(self._pending) > window:
            self._wait(self._pending.popleft())

    def flush(self) -> None:
        while self._pending:
            self._wait(self._pending.popleft())

    def _wait(self, info: mqtt.MQTTMessageInfo) -> None:
        try:
            info.wait_for_publish(self.timeout * 3)
        except (RuntimeError, ValueError) as exc:
            raise BrokerError(f"publish failed: {exc}") from None
        if not info.is_published():
            raise BrokerError(
                f"{self.cfg.url}: publish not acknowledged within {self.timeout * 3:g}s"
            )


def connect(
    cfg: BrokerConfig, tries: int = 3, client_id: str = "", timeout: float = 10.0
) -> SyncClient:
    """A connected client (the caller closes it), trying ``tries`` times with backoff: a broker
    restarting is transient."""
    for attempt in range(1, tries + 1):
        try:
            return SyncClient(cfg, client_id=client_id, timeout=timeout).__enter__()
        except BrokerRefused:
            raise  # a TLS or login failure: trying again will not help
        except BrokerError as exc:
            if attempt == tries:
                raise BrokerError(f"{exc} (tried {tries} times)") from None
            time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def connected(cfg: BrokerConfig, client_id: str = "") -> Iterator[SyncClient]:
    with SyncClient(cfg, client_id) as c:
        yield c
