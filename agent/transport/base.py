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

    def set_will(self, will: Will) -> None:
        """Last Will for the next connect (call before ``start``)."""

    def stop(self) -> None: ...

    @property
    def subscriptions(self) -> frozenset[str]: ...
