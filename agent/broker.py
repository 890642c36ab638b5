"""Shared core: the broker settings and the one factory that makes every MQTT client.

The agent's transport, the collector and every fleet command get their paho client from
``make_client`` and connect through ``connect``, so all of them honour the same settings:
callback API VERSION2, MQTT 3.1.1 or 5, TLS and login, keepalive and reconnect backoff.
Callers keep to paho's public API (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A persistent MQTT 5 session outlives a disconnect by this much (3.1.1 sessions never expire).
SESSION_EXPIRY_S = 7 * 24 * 3600


class BrokerConfig(BaseModel):
    """Where the broker is and how to talk to it: the [broker] table of the agent's config, and
    what the fleet commands build from --broker and its TLS/login options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "mqtt://localhost:1883"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: int = Field(default=1, ge=1, le=60)
    reconnect_max_s: int = Field(default=30, ge=1, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError("must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            _ = u.port
        except ValueError:
            raise ValueError("port is not a number") from None
        return v

    @model_validator(mode="after")
    def _tls(self) -> BrokerConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "localhost"

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"

    @property
    def port(self) -> int:
        return urlparse(self.url).port or (8883 if self.tls else 1883)

    @property
    def url_username(self) -> str | None:
        u = urlparse(self.url).username
        return unquote(u) if u else None


def make_client(
    cfg: BrokerConfig,
    client_id: str = "",
    *,
    persistent: bool = False,
    manual_ack: bool = False,
    max_inflight: int = 20,
) -> mqtt.Client:
    """A paho client set up from ``cfg``; the caller sets its callbacks and connects with ``connect``.

    ``persistent`` asks the broker to keep the session (subscriptions and unacknowledged QoS 1
    messages) across disconnects; it needs a stable ``client_id``. ``manual_ack`` leaves the
    PUBACK of each received message to ``ack``, so a message is acknowledged only once handled.
    """
    v5 = cfg.protocol == "5"
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    c.max_inflight_messages_set(max_inflight)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(min_delay=cfg.reconnect_min_s, max_delay=cfg.reconnect_max_s)
    user = cfg.username or cfg.url_username
    if user:
        c.username_pw_set(user, cfg.password)
    if cfg.tls:
        c.tls_set(
            ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
            certfile=str(cfg.cert_file) if cfg.cert_file else None,
            keyfile=str(cfg.key_file) if cfg.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    return c


def connect(
    c: mqtt.Client,
    cfg: BrokerConfig,
    *,
    persistent: bool = False,
    wait: bool = True,
    receive_maximum: int | None = None,
) -> None:
    """Connect ``c`` (made by ``make_client``) with the keepalive and session settings of ``cfg``.

    ``wait=True`` opens the TCP connection now (an OSError says why it failed: a command fails
    fast); ``wait=False`` is paho's connect_async, for a daemon that starts before its broker.
    Either way the caller then runs ``loop_start()``, whose thread reconnects with backoff.
    ``receive_maximum`` (MQTT 5) bounds how many unacknowledged messages the broker sends us.
    """
    kw: dict[str, Any] = {"keepalive": cfg.keepalive_s}
    if cfg.protocol == "5":
        kw["clean_start"] = not persistent
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        if receive_maximum is not None:
            props.ReceiveMaximum = max(1, min(receive_maximum, 65535))
        if persistent or receive_maximum is not None:
            kw["properties"] = props
    if wait:
        c.connect(cfg.host, cfg.port, **kw)
    else:
        c.connect_async(cfg.host, cfg.port, **kw)


def no_delay(c: mqtt.Client) -> None:
    """Send small packets (SUBSCRIBE, PUBACK) at once: with Nagle's algorithm they wait for the
    broker's delayed ACK (40 ms on Linux), which stalls a windowed transfer. Call in on_connect."""
    sock = c.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def ack_messages(c: mqtt.Client, messages: Iterable[tuple[int, int]]) -> int:
    """Acknowledge received ``(mid, qos)`` messages of a manual-ack client through paho's public
    ``ack()``; QoS 0 needs none. Returns how many acks were queued."""
    n = 0
    for mid, qos in messages:
        if qos > 0:
            c.ack(mid, qos)
            n += 1
    return n
