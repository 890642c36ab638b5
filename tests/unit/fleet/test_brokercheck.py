"""The broker check's verdicts and explanations, against a broker double with one defect each:
the failures real brokers showed (RabbitMQ 3.10's MQTT plugin, per-node retained state) that
mosquitto cannot be made to show. The double replaces only the transport below the checks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from agent.errors import BrokerError, BrokerUnfitError
from fleet.brokercheck import (
    explain_missing_index,
    run_checks,
    unseen_error,
)
from fleet.collect import ShareWatch
from fleet.db import Batch
from fleet.mqtt import Listener, shared_filter


@dataclass
class FakeBroker:
    """In-memory MQTT semantics, with switchable defects."""

    rewrite_dots: bool = False  # RabbitMQ 3.10: '.' in a published topic comes back as '/'
    retained_to_wildcards: bool = True  # RabbitMQ 3.10: only exact subscriptions get them
    share_delivers: bool = True  # RabbitMQ 3.10, amqtt: $share granted, nothing delivered
    retained: dict[str, bytes] = field(default_factory=dict)
    clients: list[FakeClient] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.rewrite_dots:
            topic = topic.replace(".", "/")
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        groups_done: set[str] = set()
        for c in list(self.clients):
            for li in c.listeners:
                for f, _q in li.filters:
                    if f.startswith("$share/"):
                        if not self.share_delivers or f in groups_done:
                            continue
                        if mqtt.topic_matches_sub(shared_filter(f), topic):
                            groups_done.add(f)
                            li.put(topic, payload, 1)
                    elif mqtt.topic_matches_sub(f, topic):
                        li.put(topic, payload, 1)
                        break


@dataclass
class FakeClient:
    broker: FakeBroker
    will: tuple[str, bytes] | None = None
    listeners: list[Listener] = field(default_factory=list)

    def listen(self, filters: list[tuple[str, int]], wait: bool = False) -> Listener:
        li = Listener(filters)
        self.listeners.append(li)
        li.subscribed.set()
        for f, _q in filters:
            if f.startswith("$share/"):
                continue
            if not self.broker.retained_to_wildcards and ("+" in f or "#" in f):
                continue
            for t, p in self.broker.retained.items():
                if mqtt.topic_matches_sub(f, t):
                    li.put(t, p, 1)
        return li

    def unlisten(self, li: Listener) -> None:
        self.listeners.remove(li)

    def publish(self, topic: str, payload: bytes, retain: bool = True, window: int = 32) -> None:
        self.broker.publish(topic, payload, retain)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self in self.broker.clients:
            self.broker.clients.remove(self)

    def drop(self) -> None:
        self.close()
        if self.will is not None:
            self.broker.publish(self.will[0], self.will[1], False)


def opener(*nodes: FakeBroker):  # type: ignore[no-untyped-def]
    def open_client(node: int, will: tuple[str, bytes] | None) -> FakeClient:
        c = FakeClient(nodes[node], will)
        nodes[node].clients.append(c)
        return c

    return open_client


def by_name(rep: object) -> dict[str, object]:
    return {c.name: c for c in rep.checks}  # type: ignore[attr-defined]


def test_a_conforming_broker_holds_everything_and_is_left_clean() -> None:
    b = FakeBroker()
    rep = run_checks(opener(b), ["mqtt://a"], 4096, timeout=0.3)
    assert rep.ok
    statuses = {c.name: c.status for c in rep.checks}
    assert statuses.pop("cluster") == "skipped"
    assert set(statuses.values()) == {"holds"}
    assert b.retained == {} and rep.leftover == []
    assert rep.as_dict()["checks"][0].keys() == {"name", "what", "status", "detail", "loses"}


def test_rabbitmq_310_defects_are_each_named_with_what_the_fleet_loses() -> None:
    b = FakeBroker(rewrite_dots=True, retained_to_wildcards=False, share_delivers=False)
    t0 = time.monotonic()
    rep = run_checks(opener(b), ["mqtt://rabbit"], 4096, timeout=0.3)
    assert time.monotonic() - t0 < 10  # bounded: each wait is the timeout
    checks = by_name(rep)
    assert not rep.ok
    rw = checks["retained-wildcard"]
    assert rw.status == "fails" and "fleet status would not see devices' retained state" in rw.loses  # type: ignore[attr-defined]
    tn = checks["topic-names"]
    assert tn.status == "fails" and "rewrites topic names" in tn.loses  # type: ignore[attr-defined]
    assert tn.detail.endswith(f"delivered as {rep.prefix}/dots/a/b/1/0/0")  # type: ignore[attr-defined]
    sh = checks["share"]
    assert sh.status == "fails" and sh.loses == "collect --share-group would store nothing"  # type: ignore[attr-defined]
    assert checks["qos1"].status == "holds"  # type: ignore[attr-defined]
    assert checks["last-will"].status == "holds"  # type: ignore[attr-defined]


def test_two_nodes_that_do_not_share_retained_messages_fail_the_cluster_check() -> None:
    rep = run_checks(opener(FakeBroker(), FakeBroker()), ["mqtt://n1", "mqtt://n2"], 4096, 0.3)
    ck = by_name(rep)["cluster"]
    assert ck.status == "fails" and "retained messages are per node" in ck.loses  # type: ignore[attr-defined]
    one = FakeBroker()
    assert run_checks(opener(one, one), ["mqtt://n1", "mqtt://n2"], 4096, 0.3).ok


def test_a_share_group_that_copies_to_every_member_fails() -> None:
    class Copies(FakeBroker):
        def publish(self, topic: str, payload: bytes, retain: bool) -> None:
            super().publish(topic, payload, retain)
            for c in self.clients:  # a broker that treats $share like a plain subscription
                for li in c.listeners:
                    if li.filters[0][0].startswith("$share/") and li.matches(topic):
                        li.put(topic, payload, 1)

    ck = by_name(run_checks(opener(Copies(share_delivers=False)), ["mqtt://x"], 4096, 0.3))["share"]
    assert ck.status == "fails" and "more than one member" in ck.detail  # type: ignore[attr-defined]


def test_publish_read_back_names_the_rewritten_topic() -> None:
    b = FakeBroker(rewrite_dots=True, retained_to_wildcards=False)
    c = opener(b)(0, None)
    topic = "edgefleet/v1/artifacts/index/digits/1.0.0/generic-cpu"
    c.publish(topic, b"entry", retain=True)
    err = unseen_error(c, "mqtt://rabbit:1883", topic)  # what publish's read-back raises
    assert isinstance(err, BrokerUnfitError) and err.exit_code == 12
    assert str(err) == (
        f"mqtt://rabbit:1883: the broker rewrote topic {topic} as "
        "edgefleet/v1/artifacts/index/digits/1/0/0/generic-cpu (RabbitMQ's MQTT plugin does "
        "this); see `edgefleet broker check`"
    )


def test_a_lost_retained_message_on_a_sound_broker_keeps_the_plain_error() -> None:
    err = unseen_error(opener(FakeBroker())(0, None), "mqtt://m", "edgefleet/v1/x")  # type: ignore[arg-type]
    assert type(err) is BrokerError and "acknowledged edgefleet/v1/x but does not hold it" in str(
        err
    )


def test_index_lookup_explanations() -> None:
    assert explain_missing_index(opener(FakeBroker())(0, None)) == ""  # type: ignore[arg-type]
    wild = explain_missing_index(opener(FakeBroker(retained_to_wildcards=False))(0, None))  # type: ignore[arg-type]
    assert "does not deliver retained messages to wildcard subscriptions" in wild
    dots = explain_missing_index(opener(FakeBroker(rewrite_dots=True))(0, None))  # type: ignore[arg-type]
    assert "'a.b' came back as 'a/b'" in dots


def _state_batch(device: str, online: bool) -> Batch:
    b = Batch.empty()
    b.device_states.append((device, online, None, None, "[]", None, None, None, 1, 0.0, 0.0))
    return b


def test_share_watch_warns_once_when_online_devices_send_nothing_shared() -> None:
    w = ShareWatch("g", silence_s=10)
    state = [("edgefleet/v1/devices/d1/state", b"", 1, 1, 0.0)]
    w.saw(state, _state_batch("d1", True))
    assert w.warning(w.started + 5) is None  # not yet
    msg = w.warning(w.started + 11)
    assert msg is not None and "$share/g/edgefleet/v1/devices/+/events" in msg
    assert "edgefleet broker check" in msg
    assert w.warning(w.started + 20) is None  # once


def test_share_watch_is_quiet_when_shared_messages_arrive_or_nobody_is_online() -> None:
    w = ShareWatch("g", silence_s=1)
    w.saw([("edgefleet/v1/devices/d1/telemetry", b"", 1, 1, 0.0)], _state_batch("d1", True))
    assert w.warning(w.started + 5) is None
    off = ShareWatch("g", silence_s=1)
    off.saw([], _state_batch("d1", False))
    assert off.warning(off.started + 5) is None
    assert ShareWatch(None, 1).warning(time.monotonic() + 5) is None


def test_listener_matches_shared_filters() -> None:
    li = Listener([("$share/g/edgefleet/v1/devices/+/telemetry", 1)])
    assert li.matches("edgefleet/v1/devices/d1/telemetry")
    assert not li.matches("edgefleet/v1/devices/d1/events")
