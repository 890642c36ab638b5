"""paho-mqtt 2.x transport, used as its README intends: VERSION2 callbacks, connect_async +
loop_start, reconnect with backoff, subscriptions renewed in on_connect, callbacks only enqueue.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import BrokerConfig
from agent.transport.base import ConnectCallback, MessageCallback, Will

log = logging.getLogger(__name__)


def _no_delay(client: mqtt.Client) -> None:
    """Send small packets (SUBSCRIBE, PUBACK) at once: with Nagle's algorithm they wait for the
    broker's delayed ACK (40 ms on Linux), which stalls a windowed chunk transfer."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)



def apply_login_and_tls(c: mqtt.Client, broker: BrokerConfig) -> None:
    """User name/password (from the config or the URL) and TLS with the configured certificates;
    every MQTT client of the project (agent, publisher, collector) sets itself up through this."""
    user = broker.username or broker.url_username
    if user:
        c.username_pw_set(user, broker.password)
    if broker.tls:
        c.tls_set(
            ca_certs=str(broker.ca_file) if broker.ca_file else None,
            certfile=str(broker.cert_file) if broker.cert_file else None,
            keyfile=str(broker.key_file) if broker.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )

class _PahoDelivery:
    """Delivery over paho's MQTTMessageInfo (is_published is set by the PUBACK)."""

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self._info = info

    def acked(self) -> bool:
        try:
            return bool(self._info.is_published())
        except ValueError:
            return False
        except RuntimeError:
            # publish() raced a disconnect: paho reports NO_CONN yet keeps the message and sends it
            # after the reconnect; is_published() then raises forever, so read the flag it guards.
            return bool(getattr(self._info, "_published", False))

    def wait(self, timeout: float) -> bool:
        try:
            self._info.wait_for_publish(timeout)
        except ValueError:
            return False
        except RuntimeError:
            deadline = time.monotonic() + timeout
            while not self.acked() and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.acked()


class MqttTransport:
    def __init__(self, broker: BrokerConfig, client_id: str) -> None:
        self._cfg = broker
        v5 = broker.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
        )
        self._subs: set[str] = set()
        self._lock = threading.Lock()
        self._on_message: MessageCallback | None = None
        self._on_connect: ConnectCallback | None = None
        self.connected = threading.Event()
        self._connects = 0
        c = self._client
        c.max_inflight_messages_set(32)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=broker.reconnect_min_s, max_delay=broker.reconnect_max_s)
        apply_login_and_tls(c, broker)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message

    # -- paho callbacks (network thread): only bookkeeping and enqueueing --------------------
    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                        properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%s", self._cfg.host, self._cfg.port)
        _no_delay(client)
        with self._lock:
            subs = sorted(self._subs)
        if subs:
            client.subscribe([(t, 1) for t in subs])
        self._connects += 1
        self.connected.set()
        if self._on_connect is not None:
            self._on_connect()

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                           properties: Any) -> None:
        self.connected.clear()
        log.info("disconnected (%s); reconnecting with backoff", reason_code)

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))

    # -- Transport interface ------------------------------------------------------------------
    def set_will(self, will: Will) -> None:
        self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)

    def start(self, on_message: MessageCallback, on_connect: ConnectCallback) -> None:
        self._on_message, self._on_connect = on_message, on_connect
        self._client.connect_async(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s)
        self._client.loop_start()

    def subscribe(self, topics: list[str]) -> None:
        with self._lock:
            new = [t for t in topics if t not in self._subs]
            self._subs.update(new)
        if new and self.connected.is_set():
            self._client.subscribe([(t, 1) for t in new])

    def unsubscribe(self, topics: list[str]) -> None:
        with self._lock:
            gone = [t for t in topics if t in self._subs]
            self._subs.difference_update(gone)
        if gone and self.connected.is_set():
            self._client.unsubscribe(gone)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain)

    def publish_tracked(self, topic: str, payload: bytes) -> _PahoDelivery:
        # paho keeps an unacknowledged QoS 1 message and resends it, in order, after a reconnect
        return _PahoDelivery(self._client.publish(topic, payload, qos=1, retain=False))

    def is_connected(self) -> bool:
        return self.connected.is_set()

    @property
    def connects(self) -> int:
        return self._connects

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def subscriptions(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._subs)
