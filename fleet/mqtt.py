"""A small synchronous paho wrapper for workstation commands (publish, deploy)."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from agent.config import BrokerConfig
from agent.errors import EdgefleetError, UsageError
from agent.transport.mqtt import apply_login_and_tls


class BrokerError(EdgefleetError):
    """The broker cannot be reached or refused us."""

    exit_code = 8


def broker_config(url: str, ca_file: str | None = None, cert_file: str | None = None,
                  key_file: str | None = None, username: str | None = None,
                  password: str | None = None) -> BrokerConfig:
    try:
        return BrokerConfig(url=url, ca_file=Path(ca_file) if ca_file else None,
                            cert_file=Path(cert_file) if cert_file else None,
                            key_file=Path(key_file) if key_file else None,
                            username=username, password=password)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise UsageError(f"--broker {url}: {where}: {e['msg']}") from None


class SyncClient:
    """Connects (blocking, with a timeout), publishes QoS 1 with a bounded window of unacked
    messages, and reads retained messages."""

    def __init__(self, cfg: BrokerConfig, client_id: str = "", timeout: float = 10.0) -> None:
        self.cfg, self.timeout = cfg, timeout
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.max_inflight_messages_set(64)
        apply_login_and_tls(self.c, cfg)
        self._connected = threading.Event()
        self._refused: str | None = None
        self._lock = threading.Lock()
        self.messages: dict[str, bytes] = {}
        self._last_msg = 0.0
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self._pending: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._refused = str(rc)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages[msg.topic] = bytes(msg.payload)
            self._last_msg = time.monotonic()

    def __enter__(self) -> SyncClient:
        try:
            self.c.connect(self.cfg.host, self.cfg.port, keepalive=30)
        except OSError as exc:
            raise BrokerError(f"cannot connect to {self.cfg.url}: {exc.strerror or exc}") from None
        self.c.loop_start()
        if not self._connected.wait(self.timeout):
            self.close()
            raise BrokerError(f"{self.cfg.url}: no answer within {self.timeout:g}s")
        if self._refused:
            self.close()
            raise BrokerError(f"{self.cfg.url} refused the connection: {self._refused}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()

    def publish(self, topic: str, payload: bytes, retain: bool = True, window: int = 32) -> None:
        """QoS 1; waits for acks so that at most ``window`` messages are unacknowledged."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
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
            raise BrokerError(f"{self.cfg.url}: publish not acknowledged within {self.timeout * 3:g}s")

    def retained_one(self, topic: str, limit: float = 5.0) -> bytes | None:
        """The retained message on one exact ``topic``, waiting for it up to ``limit`` s; None if none came."""
        with self._lock:
            self.messages.pop(topic, None)
        self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + limit
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    if topic in self.messages:
                        return self.messages[topic] or None
                time.sleep(0.01)
            return None
        finally:
            self.c.unsubscribe(topic)

    def retained(self, pattern: str, quiet: float = 0.5, limit: float = 3.0) -> dict[str, bytes]:
        """Retained messages matching ``pattern``: wait until none arrived for ``quiet`` s."""
        with self._lock:
            self.messages.clear()
            self._last_msg = time.monotonic()
        self.c.subscribe(pattern, qos=1)
        start = time.monotonic()
        while time.monotonic() - start < limit:
            time.sleep(0.05)
            with self._lock:
                if time.monotonic() - self._last_msg > quiet:
                    break
        self.c.unsubscribe(pattern)
        with self._lock:
            return {t: p for t, p in self.messages.items() if p}


def connect(cfg: BrokerConfig, tries: int = 3, client_id: str = "", timeout: float = 10.0) -> SyncClient:
    """A connected client (the caller closes it), trying ``tries`` times with backoff: a broker
    restarting is transient."""
    for attempt in range(1, tries + 1):
        try:
            return SyncClient(cfg, client_id=client_id, timeout=timeout).__enter__()
        except BrokerError as exc:
            if attempt == tries:
                raise BrokerError(f"{exc} (tried {tries} times)") from None
            time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def connected(cfg: BrokerConfig, client_id: str = "") -> Iterator[SyncClient]:
    with SyncClient(cfg, client_id) as c:
        yield c
