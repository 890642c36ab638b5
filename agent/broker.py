"""Shared core: the broker settings and the one factory that makes every MQTT client.

The agent's transport, the collector and every fleet command get their paho client from
``make_client`` and connect through ``connect``, so all of them honour the same settings:
callback API VERSION2, MQTT 3.1.1 or 5, TLS and login, keepalive and reconnect backoff.
Callers keep to paho's public API (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import sys
import time
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


# -- why a connection failed ---------------------------------------------------------------------

_SSL_REASON_RE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_NO_CLIENT_CERT = ("CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
_CLIENT_CERT_REFUSED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")


def _tls_cause(reason: str, text: str, cfg: BrokerConfig) -> str:
    if any(r in reason for r in _NO_CLIENT_CERT) or (
        "HANDSHAKE_FAILURE" in reason and cfg.cert_file is None
    ):
        return "TLS: the broker requires a client certificate (set cert_file and key_file)"
    if any(r in reason for r in _CLIENT_CERT_REFUSED):
        return (
            f"TLS: the broker refused our client certificate {cfg.cert_file} ({reason.lower()}): "
            "is it issued by the CA the broker trusts?"
        )
    if any(r in reason for r in _NOT_TLS):
        return f"TLS: {cfg.host}:{cfg.port} does not speak TLS (is it an mqtt:// port?)"
    if "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
        return f"TLS: no TLS version in common with the broker ({reason.lower()})"
    return f"TLS: {reason.lower() if reason else text}"


def connect_failure_cause(exc: BaseException | None, cfg: BrokerConfig) -> str:
    """One line naming why opening a connection to the broker failed: the TLS check that failed,
    or the network error. ``exc`` is what paho's connect raised."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        vm = str(exc.verify_message or exc.reason or exc)
        if "mismatch" in vm.lower():
            return (
                f"TLS: the broker's certificate is not valid for host '{cfg.host}' ({vm}): use a "
                "host name the certificate names, or issue the broker one that names this host"
            )
        ca = f"ca_file {cfg.ca_file}" if cfg.ca_file else "the system CAs (no ca_file set)"
        return (
            f"TLS: certificate verify failed ({vm}): the broker's certificate is not signed by {ca}"
        )
    if isinstance(exc, ssl.SSLError):
        return _tls_cause(str(exc.reason or ""), str(exc), cfg)
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {cfg.host}:{cfg.port} (is the broker running and listening there?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host '{cfg.host}' ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return f"no answer from {cfg.host}:{cfg.port} (timed out)"
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return f"connection failed ({type(exc).__name__}: {exc})" if exc else "connection failed"


def is_permanent(exc: BaseException) -> bool:
    """A TLS failure does not fix itself in seconds: a command should not retry it."""
    return isinstance(exc, ssl.SSLError)


def refusal_cause(reason_code: Any) -> str:
    """One line for a CONNACK that refused us (MQTT 3.1.1 return code or MQTT 5 reason code)."""
    text = str(reason_code)
    low = text.lower()
    if "not authori" in low:
        return (
            "the broker refused the login: not authorised (is this identity allowed to connect? "
            "with client certificates, the certificate's CN is the user name)"
        )
    if "user name or password" in low:
        return "the broker refused the login: bad user name or password"
    return f"the broker refused the connection: {text}"


class ConnectWatch:
    """Finds out why a client made by ``make_client`` cannot connect, and (with ``log``) logs each
    distinct cause once per ``period`` seconds (the longest reconnect backoff by default).

    paho reports a failed TCP/TLS handshake only to ``on_connect_fail``, without the error (it
    calls it inside its ``except OSError`` block, so ``sys.exc_info()`` is the error), and a
    broker that rejects our certificate after a TLS 1.3 handshake only as a failed read, in its
    log. The owner of the client calls ``install`` once, then ``connack`` from on_connect and
    ``disconnected`` from on_disconnect; each returns the cause when there is one.
    """

    def __init__(
        self, cfg: BrokerConfig, log: logging.Logger | None = None, period: float | None = None
    ) -> None:
        self.cfg, self.log = cfg, log
        self.period = float(cfg.reconnect_max_s if period is None else period)
        self.cause: str | None = None  # the latest failure's cause; None once connected
        self.failures = 0  # failed attempts since the last success
        self._logged: dict[str, float] = {}
        self._recv_error = ""
        self._connack = False
        self._client: mqtt.Client | None = None

    def install(self, c: mqtt.Client) -> None:
        self._client = c
        c.on_connect_fail = self._connect_fail
        c.on_pre_connect = self._pre_connect
        c.on_log = self._paho_log  # off once connected: paho formats every line it logs

    def _pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._connack, self._recv_error = False, ""
        client.on_log = self._paho_log

    def _paho_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and buf.startswith("failed to receive on socket"):
            self._recv_error = buf

    def _connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.failed(sys.exc_info()[1])

    def failed(self, exc: BaseException | None) -> str:
        """Record a connect that raised ``exc``; returns its cause."""
        return self._failure(connect_failure_cause(exc, self.cfg))

    def connack(self, reason_code: Any) -> str | None:
        """From on_connect: None when accepted, else the cause of the refusal."""
        self._connack = True
        if reason_code.is_failure:
            return self._failure(refusal_cause(reason_code))
        if self.log is not None and self.failures:
            self.log.info(
                "connected to %s:%s after %d failed attempts",
                self.cfg.host,
                self.cfg.port,
                self.failures,
            )
        self.cause, self.failures = None, 0
        self._logged.clear()
        if self._client is not None:
            self._client.on_log = None
        return None

    def disconnected(self) -> str | None:
        """From on_disconnect: the cause when the connection closed before any CONNACK."""
        if self._connack:
            return None
        m = _SSL_REASON_RE.search(self._recv_error)
        if m:
            cause = _tls_cause(m.group(1), self._recv_error, self.cfg)
        elif self._recv_error and self.cfg.tls and self.cfg.cert_file is None:
            # TLS 1.3: the broker checks our certificate after the handshake, and its alert may
            # be lost in the close (an EOF instead of CERTIFICATE_REQUIRED)
            cause = (
                "TLS: the broker closed the connection before accepting it; it probably requires "
                f"a client certificate (set cert_file and key_file) [{self._recv_error}]"
            )
        elif self._recv_error and self.cfg.tls:
            cause = (
                "TLS: the broker closed the connection before accepting it; it probably refused "
                f"our client certificate {self.cfg.cert_file} (issued by another CA?) "
                f"[{self._recv_error}]"
            )
        elif self._recv_error:
            cause = self._recv_error + " (a TLS port reached with mqtt://?)"
        else:
            cause = (
                "the broker closed the connection before accepting it (a TLS port reached "
                "with mqtt://? the broker's log says why)"
            )
        self._connack = True  # one report per attempt
        return self._failure(cause)

    def _failure(self, cause: str) -> str:
        self.cause = cause
        self.failures += 1
        now = time.monotonic()
        last = self._logged.get(cause)
        if self.log is not None and (last is None or now - last >= self.period):
            self._logged[cause] = now
            self.log.warning("cannot connect to %s: %s", self.cfg.url, cause)
        return cause
