"""Message transport behind a small interface (MQTT via paho; an in-memory fake for tests)."""

from agent.transport.base import Transport, Will

__all__ = ["Transport", "Will"]
