"""The transport interface the agent is written against: MQTT in production, a fake in unit tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


class Delivery(Protocol):
    """A tracked QoS 1 publish: ``acked`` turns true once the broker's PUBACK has arrived."""

    def acked(self) -> bool: ...

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the PUBACK; True if it has arrived."""


# Callbacks run on the transport's thread: they must only enqueue.
MessageCallback = Callable[[str, bytes, bool], None]
ConnectCallback = Callable[[], None]


class Transport(Protocol):
    def start(self, on_message: MessageCallback, on_connect: ConnectCallback) -> None:
        """Connect in the background; reconnect forever; call ``on_connect`` after each connect."""

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe now if connected; kept and renewed after every reconnect."""

    def unsubscribe(self, topics: list[str]) -> None: ...

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1; queued by the client while disconnected."""

    def publish_tracked(self, topic: str, payload: bytes) -> Delivery:
        """QoS 1, not retained; the result tells when the broker acknowledged it. A message not
        acknowledged before a disconnect is sent again, in order, after the reconnect."""

    def is_connected(self) -> bool: ...

    @property
    def connects(self) -> int:
        """How many times the transport has connected (tells one connection from the next)."""

    def set_will(self, will: Will) -> None:
        """Last Will for the next connect (call before ``start``)."""

    def stop(self) -> None: ...

    @property
    def subscriptions(self) -> frozenset[str]: ...
