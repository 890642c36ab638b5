"""paho-mqtt 2.x transport, used as its README intends: VERSION2 callbacks, connect_async +
loop_start, reconnect with backoff, subscriptions renewed in on_connect, callbacks only enqueue.
The client comes from the shared factory (agent.broker), like every other MQTT client here.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt

from agent.broker import BrokerConfig, ConnectWatch, connect, make_client, no_delay
from agent.transport.base import ConnectCallback, MessageCallback, Will

log = logging.getLogger(__name__)


RECENT_ACKS = 4096  # PUBACKed message ids remembered for deliveries that raced a disconnect


class _PahoDelivery:
    """Delivery over paho's MQTTMessageInfo (is_published is set by the PUBACK)."""

    def __init__(self, info: mqtt.MQTTMessageInfo, transport: MqttTransport) -> None:
        self._info, self._t = info, transport

    def acked(self) -> bool:
        try:
            return bool(self._info.is_published())
        except ValueError:
            return False
        except RuntimeError:
            # publish() raced a disconnect: paho reports NO_CONN yet keeps the message and sends it
            # after the reconnect; is_published() then raises forever, so ask on_publish's record.
            return self._t.was_acked(self._info.mid)

    def wait(self, timeout: float) -> bool:
        try:
            self._info.wait_for_publish(timeout)
        except ValueError:
            return False
        except RuntimeError:
            return self._t.wait_acked(self._info.mid, timeout)
        return self.acked()


class MqttTransport:
    def __init__(self, broker: BrokerConfig, client_id: str) -> None:
        self._cfg = broker
        self._client = make_client(broker, client_id, max_inflight=32)
        self._subs: set[str] = set()
        self._lock = threading.Lock()
        self._on_message: MessageCallback | None = None
        self._on_connect: ConnectCallback | None = None
        self.connected = threading.Event()
        self._connects = 0
        self._stopping = False
        self._acks = threading.Condition()
        self._recent_acks: collections.OrderedDict[int, None] = collections.OrderedDict()
        c = self._client
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        # logs why connecting fails (TLS, refused login), once per cause per backoff period
        self._watch = ConnectWatch(broker, log)
        self._watch.install(c)

    # -- paho callbacks (network thread): only bookkeeping and enqueueing --------------------
    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if self._watch.connack(reason_code) is not None:
            return
        log.info("connected to %s:%s", self._cfg.host, self._cfg.port)
        no_delay(client)
        with self._lock:
            subs = sorted(self._subs)
        if subs:
            client.subscribe([(t, 1) for t in subs])
        self._connects += 1
        self.connected.set()
        if self._on_connect is not None:
            self._on_connect()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connected.clear()
        if self._watch.disconnected() is not None or self._watch.cause is not None:
            return  # the broker never accepted this connection: the watch logged why
        if self._stopping:
            log.info("disconnected from %s:%s", self._cfg.host, self._cfg.port)
        else:
            log.info("disconnected (%s); reconnecting with backoff", reason_code)

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        with self._acks:
            self._recent_acks[mid] = None
            self._recent_acks.move_to_end(mid)
            while len(self._recent_acks) > RECENT_ACKS:
                self._recent_acks.popitem(last=False)
            self._acks.notify_all()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))

    # -- Transport interface ------------------------------------------------------------------
    def set_will(self, will: Will) -> None:
        self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)

    def start(self, on_message: MessageCallback, on_connect: ConnectCallback) -> None:
        self._on_message, self._on_connect = on_message, on_connect
        connect(self._client, self._cfg, wait=False)
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
        return _PahoDelivery(self._client.publish(topic, payload, qos=1, retain=False), self)

    def was_acked(self, mid: int) -> bool:
        """Whether the broker acknowledged message ``mid`` recently (on_publish saw its PUBACK)."""
        with self._acks:
            return mid in self._recent_acks

    def wait_acked(self, mid: int, timeout: float) -> bool:
        with self._acks:
            return self._acks.wait_for(lambda: mid in self._recent_acks, timeout)

    def is_connected(self) -> bool:
        return self.connected.is_set()

    @property
    def connects(self) -> int:
        return self._connects

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def subscriptions(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._subs)
