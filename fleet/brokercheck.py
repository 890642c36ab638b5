"""`edgefleet broker check`: does this broker do what the fleet relies on?

Each check works under a scratch prefix of its own (edgefleet/v1/_check/RANDOM/...), so no
real topic is touched, and every retained message it leaves is cleared (an empty retained
payload) before it returns. Each wait is bounded by ``timeout``. The checks talk to the broker
through the small ``Client`` surface of fleet.mqtt.SyncClient, so unit tests can run them
against a broker double that has one defect (RabbitMQ's, say) without a real broker.

The quick probes at the end serve publish and deploy: when a read-back fails they ask the
broker whether it rewrites topic names or keeps retained messages from wildcard subscriptions,
and name that instead of a misleading "not found".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from agent.errors import BrokerError, BrokerUnfitError, EdgefleetError
from agent.protocol import topics
from fleet.mqtt import Listener, Message

SCRATCH = f"{topics.PREFIX}/_check"
SHARE_MESSAGES = 20
SEE = "see `edgefleet broker check`"

Status = Literal["holds", "fails", "skipped"]


class Client(Protocol):
    """What the checks use of a connected fleet.mqtt.SyncClient."""

    def listen(self, filters: list[tuple[str, int]], wait: bool = False) -> Listener: ...
    def unlisten(self, li: Listener) -> None: ...
    def publish(
        self, topic: str, payload: bytes, retain: bool = True, window: int = 32
    ) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def drop(self) -> None: ...


# open_client(node, will): a connected client of broker ``node`` (an index into the URLs)
Opener = Callable[[int, "tuple[str, bytes] | None"], Client]


@dataclass
class Check:
    name: str
    what: str  # what is checked, one line
    status: Status = "skipped"
    detail: str = ""  # what was seen
    loses: str = ""  # what the fleet would lose, when it fails

    def holds(self, detail: str = "") -> None:
        self.status, self.detail = "holds", detail

    def fails(self, detail: str, loses: str) -> None:
        self.status, self.detail, self.loses = "fails", detail, loses


@dataclass
class Report:
    brokers: list[str]
    prefix: str
    checks: list[Check] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)  # retained scratch topics not cleared
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.status != "fails" for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "brokers": self.brokers,
            "prefix": self.prefix,
            "checks": [asdict(c) for c in self.checks],
            "leftover": self.leftover,
            "seconds": round(self.seconds, 2),
        }


def scratch_prefix() -> str:
    return f"{SCRATCH}/{secrets.token_hex(6)}"


def _first(
    li: Listener, timeout: float, want: Callable[[Message], bool] = lambda m: True
) -> Message | None:
    """The first message on ``li`` that ``want``s, waiting up to ``timeout`` s in all."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        m = li.get(left)
        if m is not None and m.payload and want(m):
            return m
    return None


def _read(
    c: Client, topic_filter: str, timeout: float, payload: bytes | None = None
) -> Message | None:
    """Subscribe to ``topic_filter`` and wait for a (retained) message, the given ``payload`` if any."""
    li = c.listen([(topic_filter, 1)], wait=True)
    try:
        return _first(li, timeout, lambda m: payload is None or m.payload == payload)
    finally:
        c.unlisten(li)


class Checker:
    """Runs the checks against ``nodes`` brokers (two: nodes of one cluster)."""

    def __init__(
        self, open_client: Opener, nodes: int = 1, timeout: float = 5.0, prefix: str = ""
    ) -> None:
        self.open, self.nodes, self.timeout = open_client, nodes, timeout
        self.prefix = prefix or scratch_prefix()
        self.retained: dict[int, set[str]] = {}  # node -> retained topics to clear

    @contextlib.contextmanager
    def client(self, node: int = 0, will: tuple[str, bytes] | None = None) -> Iterator[Client]:
        c = self.open(node, will)
        try:
            yield c
        finally:
            c.close()

    def keep(self, c: Client, node: int, topic: str, payload: bytes) -> None:
        """Publish a retained message (remembered for the clean-up) and wait for its PUBACK."""
        self.retained.setdefault(node, set()).add(topic)
        c.publish(topic, payload, retain=True)
        c.flush()

    # -- the checks ---------------------------------------------------------------------------
    def retained_wildcard(self, ck: Check) -> None:
        base = f"{self.prefix}/wild"
        topic, payload = f"{base}/x", b"retained-" + secrets.token_bytes(8).hex().encode()
        with self.client() as pub, self.client() as sub:
            self.keep(pub, 0, topic, payload)
            exact = _read(sub, topic, self.timeout, payload) is not None
            missing = [
                f
                for f in (f"{base}/+", f"{base}/#")
                if _read(sub, f, self.timeout, payload) is None
            ]
        if not exact:
            ck.fails(
                f"a retained message on {topic} is not delivered even to an exact subscription",
                "devices could not fetch artifacts or deployments (everything the fleet hands "
                "out is a retained message)",
            )
        elif missing:
            ck.fails(
                f"retained message delivered to an exact subscription but not to {' nor '.join(missing)}",
                "fleet status would not see devices' retained state, and deploy could not read "
                "the artifact index",
            )
        else:
            ck.holds("delivered to '+' and '#' subscriptions")

    def topic_names(self, ck: Check) -> None:
        base = f"{self.prefix}/dots"
        topic, payload = f"{base}/a.b/1.0.0", b"dots"
        with self.client() as pub, self.client() as sub:
            live = sub.listen([(f"{base}/#", 1)], wait=True)
            self.keep(pub, 0, topic, payload)
            seen = _first(live, self.timeout, lambda m: m.payload == payload)
            sub.unlisten(live)
            back = _read(sub, topic, self.timeout, payload)
        if back is not None and back.topic == topic and (seen is None or seen.topic == topic):
            ck.holds(f"{topic} came back unchanged")
            return
        loses = "publish/deploy would fail: the broker rewrites topic names (artifact versions contain '.')"
        if seen is not None and seen.topic != topic:
            ck.fails(f"published on {topic}, delivered as {seen.topic}", loses)
        else:
            ck.fails(f"a message published on {topic} did not come back on that topic", loses)

    def qos1(self, ck: Check) -> None:
        topic, payload = f"{self.prefix}/qos/x", b"qos1"
        with self.client() as pub, self.client() as sub:
            li = sub.listen([(topic, 1)], wait=True)
            try:
                pub.publish(topic, payload, retain=False)
                pub.flush()
            except BrokerError as exc:
                ck.fails(f"QoS 1 publish not acknowledged: {exc}", "every fleet command would fail")
                return
            m = _first(li, self.timeout)
        loses = "devices' events, telemetry and command results could be lost on the way"
        if m is None:
            ck.fails("acknowledged, but not delivered to a QoS 1 subscriber", loses)
        elif m.qos != 1:
            ck.fails(f"acknowledged, but delivered at QoS {m.qos}", loses)
        else:
            ck.holds("acknowledged and delivered at QoS 1")

    def last_will(self, ck: Check) -> None:
        topic, payload = f"{self.prefix}/will/x", b"gone"
        with self.client() as sub:
            li = sub.listen([(topic, 1)], wait=True)
            dev = self.open(0, (topic, payload))
            dev.drop()
            dev.close()
            m = _first(li, self.timeout)
        if m is None:
            ck.fails(
                "a client that dropped its connection without DISCONNECT left no Last Will",
                "a device that loses power or network would still show as online",
            )
        else:
            ck.holds("published when the client's socket closed")

    def chunk(self, ck: Check, chunk_size: int) -> None:
        topic, payload = f"{self.prefix}/chunk/0", os.urandom(chunk_size)
        with self.client() as pub, self.client() as sub:
            try:
                self.keep(pub, 0, topic, payload)
                m = _read(sub, topic, self.timeout * 2)
            except BrokerError as exc:
                m, why = None, f"a retained message of {chunk_size} bytes failed: {exc}"
            else:
                why = f"a retained message of {chunk_size} bytes did not come back"
        loses = f"publish with --chunk-size {chunk_size} would not reach devices: use a smaller --chunk-size"
        if m is None:
            ck.fails(why, loses)
        elif m.payload != payload:
            ck.fails(
                f"a retained message of {chunk_size} bytes came back as {len(m.payload)} different bytes",
                loses,
            )
        else:
            ck.holds(f"{chunk_size} bytes read back byte-identical")

    def share(self, ck: Check) -> None:
        base, group = f"{self.prefix}/share", f"check{secrets.token_hex(3)}"
        loses = "collect --share-group would store nothing"
        with self.client() as pub, self.client() as s1, self.client() as s2:
            try:
                subs = [s.listen([(f"$share/{group}/{base}/+", 1)], wait=True) for s in (s1, s2)]
            except BrokerError as exc:
                ck.fails(f"a $share subscription was refused: {exc}", loses)
                return
            for i in range(SHARE_MESSAGES):
                pub.publish(f"{base}/m", str(i).encode(), retain=False)
            pub.flush()
            got: list[bytes] = []
            end = time.monotonic() + self.timeout
            while time.monotonic() < end and len(got) < SHARE_MESSAGES:
                for li in subs:
                    got += [m.payload for m in li.drain()]
                time.sleep(0.02)
            time.sleep(0.3)  # copies to the other member arrive right behind the originals
            for li in subs:
                got += [m.payload for m in li.drain()]
        if not got:
            ck.fails(
                f"$share/{group}/... was granted but none of {SHARE_MESSAGES} messages arrived",
                loses,
            )
        elif len(got) > SHARE_MESSAGES:
            ck.fails(
                f"{len(got)} deliveries of {SHARE_MESSAGES} messages: each went to more than one member",
                "collectors in one --share-group would each store every message",
            )
        elif len(set(got)) < SHARE_MESSAGES:
            ck.fails(
                f"{len(set(got))} of {SHARE_MESSAGES} messages arrived",
                loses.replace("nothing", "only part of the stream"),
            )
        else:
            ck.holds(f"{SHARE_MESSAGES} messages, each delivered once to one of two members")

    def cluster(self, ck: Check, urls: list[str]) -> None:
        topic, payload = f"{self.prefix}/cluster/x", b"node0-" + secrets.token_hex(6).encode()
        with self.client(0) as pub, self.client(1) as sub:
            self.keep(pub, 0, topic, payload)
            m = _read(sub, topic, self.timeout, payload)
        if m is None:
            ck.fails(
                f"a retained message published on {urls[0]} is not seen on {urls[1]}",
                "retained messages are per node: devices on one node would not see artifacts, "
                "deployments or trust published through another",
            )
        else:
            ck.holds(f"published on {urls[0]}, read on {urls[1]}")

    def clean_up(self) -> list[str]:
        """Clear every retained scratch message; the topics still holding one afterwards."""
        left: list[str] = []
        for node, kept in sorted(self.retained.items()):
            with contextlib.suppress(BrokerError), self.client(node) as c:
                for t in sorted(kept):
                    c.publish(t, b"", retain=True)
                c.flush()
                # The read-back on this connection lets the broker finish; a broker that stores
                # late (amqtt, a 1 MiB chunk on a loaded machine) gets a few bounded tries.
                pending = sorted(kept)
                for _ in range(4):
                    pending = [t for t in pending if _read(c, t, 0.3) is not None]
                    if not pending:
                        break
                    for t in pending:
                        c.publish(t, b"", retain=True)
                    c.flush()
                    time.sleep(0.5)
                left += pending
        return left


CHECKS = {
    "retained-wildcard": "retained message delivered to wildcard subscriptions ('+', '#')",
    "topic-names": "topic names come back unchanged, '.' included",
    "qos1": "QoS 1 publish acknowledged and delivered at QoS 1",
    "last-will": "Last Will delivered when a client drops without DISCONNECT",
    "chunk": "a retained message of the chunk size read back byte-identical",
    "share": "$share/GROUP/... delivers each message once to one member",
    "cluster": "a retained message published on one node is seen on the other",
}


def run_checks(
    open_client: Opener, urls: list[str], chunk_size: int, timeout: float = 5.0, prefix: str = ""
) -> Report:
    """Every check, in order; a check that errs fails with the error rather than stopping the rest."""
    t0 = time.monotonic()
    ch = Checker(open_client, len(urls), timeout, prefix)
    rep = Report(urls, ch.prefix)
    steps: list[tuple[str, Callable[[Check], None]]] = [
        ("retained-wildcard", ch.retained_wildcard),
        ("topic-names", ch.topic_names),
        ("qos1", ch.qos1),
        ("last-will", ch.last_will),
        ("chunk", lambda ck: ch.chunk(ck, chunk_size)),
        ("share", ch.share),
        ("cluster", lambda ck: ch.cluster(ck, urls)),
    ]
    try:
        for name, step in steps:
            ck = Check(name, CHECKS[name])
            rep.checks.append(ck)
            if name == "cluster" and len(urls) < 2:
                ck.detail = "give a second --broker (another node of the cluster) to check"
                continue
            try:
                step(ck)
            except BrokerError as exc:
                ck.fails(str(exc), "see the error: the fleet needs this to work")
    finally:
        rep.leftover = ch.clean_up()
        rep.seconds = time.monotonic() - t0
    return rep


# -- quick probes for publish and deploy ---------------------------------------------------------
def rewritten_as(c: Client, timeout: float = 2.0) -> str | None:
    """How the broker hands back a dotted topic ("a.b" -> "a/b", say); None if unchanged or
    unknown. A live message on a '#' subscription: it needs neither retained delivery nor
    retained-to-wildcard delivery, which such brokers often lack too."""
    base = scratch_prefix()
    topic = f"{base}/a.b"
    li = c.listen([(f"{base}/#", 1)], wait=True)
    try:
        c.publish(topic, b"probe", retain=False)
        c.flush()
        m = _first(li, timeout)
    finally:
        c.unlisten(li)
    if m is None or m.topic == topic:
        return None
    return m.topic[len(base) + 1 :] if m.topic.startswith(base + "/") else m.topic


def rewrite(topic: str, probe: str) -> str | None:
    """``topic`` as a broker that returned "a.b" as ``probe`` would rewrite it."""
    if probe == "a/b":
        return topic.replace(".", "/")
    return None


def retained_wildcard_broken(c: Client, timeout: float = 2.0) -> bool:
    """True if a retained message reaches an exact subscription but not a '+' one."""
    base = scratch_prefix()
    topic = f"{base}/x"
    payload = b"probe-" + secrets.token_hex(4).encode()
    c.publish(topic, payload, retain=True)
    c.flush()
    try:
        exact = _read(c, topic, timeout, payload) is not None
        wild = _read(c, f"{base}/+", timeout, payload) is not None
    finally:
        c.publish(topic, b"", retain=True)
        c.flush()
    return exact and not wild


def unseen_error(c: Client, url: str, topic: str) -> EdgefleetError:
    """The error for a retained ``topic`` the broker acknowledged but does not hand back."""
    with contextlib.suppress(BrokerError):
        probe = rewritten_as(c)
        if probe is not None:
            new = rewrite(topic, probe)
            if new is not None:
                return BrokerUnfitError(
                    f"{url}: the broker rewrote topic {topic} as {new} (RabbitMQ's MQTT plugin "
                    f"does this); {SEE}"
                )
            return BrokerUnfitError(
                f"{url}: the broker changes topic names (it delivered a.b as {probe}); {SEE}"
            )
    return BrokerError(f"{url}: the broker acknowledged {topic} but does not hold it; {SEE}")


def explain_missing_index(c: Client) -> str:
    """A reason an index lookup over a wildcard found nothing, when the broker is the cause."""
    with contextlib.suppress(BrokerError):
        probe = rewritten_as(c)
        if probe is not None:
            return f"the broker rewrites topic names ('a.b' came back as '{probe}'), so versions cannot be looked up; {SEE}"
        if retained_wildcard_broken(c):
            return f"the broker does not deliver retained messages to wildcard subscriptions, so the index cannot be read; {SEE}"
    return ""
