"""In-memory transport for unit tests: records publishes, delivers injected messages, and
replays retained messages on subscribe like a broker would (exact topics and '+' only)."""

from __future__ import annotations

import threading

from agent.transport.base import ConnectCallback, MessageCallback, Will


def topic_matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, a in enumerate(p):
        if a == "#":
            return True
        if i >= len(t) or a not in ("+", t[i]):
            return False
    return len(p) == len(t)


class FakeDelivery:
    """Acknowledged when the fake is connected at publish time, or by ``FakeTransport.connect``."""

    def __init__(self, acked: bool) -> None:
        self._acked = acked

    def acked(self) -> bool:
        return self._acked

    def wait(self, timeout: float) -> bool:
        return self._acked


class FakeTransport:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self.will: Will | None = None
        self._subs: set[str] = set()
        self._on_message: MessageCallback | None = None
        self._on_connect: ConnectCallback | None = None
        self._lock = threading.Lock()
        self.connected = True
        self._connects = 0
        # tracked publishes made while disconnected: delivered (in order) by connect()
        self._held: list[tuple[str, bytes, FakeDelivery]] = []

    def set_will(self, will: Will) -> None:
        self.will = will

    def start(self, on_message: MessageCallback, on_connect: ConnectCallback) -> None:
        self._on_message, self._on_connect = on_message, on_connect
        self._connects += 1
        on_connect()

    def subscribe(self, topics: list[str]) -> None:
        new = [t for t in topics if t not in self._subs]
        self._subs.update(new)
        for pattern in new:
            for topic, payload in list(self.retained.items()):
                if topic_matches(pattern, topic) and self._on_message is not None:
                    self._on_message(topic, payload, True)

    def unsubscribe(self, topics: list[str]) -> None:
        self._subs.difference_update(topics)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._lock:
            self.published.append((topic, payload, retain))
        if retain:
            self.retained[topic] = payload

    def publish_tracked(self, topic: str, payload: bytes) -> FakeDelivery:
        d = FakeDelivery(self.connected)
        if self.connected:
            self.publish(topic, payload)
        else:
            self._held.append((topic, payload, d))
        return d

    def is_connected(self) -> bool:
        return self.connected

    @property
    def connects(self) -> int:
        return self._connects

    def disconnect(self) -> None:
        """A broker outage: tracked publishes wait, unacknowledged, until ``connect``."""
        self.connected = False

    def connect(self) -> None:
        """The broker is back: held tracked publishes go out in order and are acknowledged."""
        self.connected = True
        self._connects += 1
        held, self._held = self._held, []
        for topic, payload, d in held:
            self.publish(topic, payload)
            d._acked = True
        if self._on_connect is not None:
            self._on_connect()

    def inject(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """A message from 'the broker': delivered if subscribed, stored if retained."""
        if retain:
            self.retained[topic] = payload
        if self._on_message is not None and any(topic_matches(p, topic) for p in self._subs):
            self._on_message(topic, payload, retain)

    def deliver(self, topic: str, payload: bytes) -> None:
        """Deliver whatever the subscriptions (a hostile broker), for robustness tests."""
        if self._on_message is not None:
            self._on_message(topic, payload, False)

    def stop(self) -> None:
        self._subs.clear()

    @property
    def subscriptions(self) -> frozenset[str]:
        return frozenset(self._subs)
