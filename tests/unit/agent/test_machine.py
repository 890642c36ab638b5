"""The deploy state machine: the table is whole, install.json stays readable both ways, and a
real deploy through the fake transport only takes transitions the table lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.deploy.agent import Agent
from agent.deploy.machine import TABLE, TRANSITIONS, InstallRecord, Machine, Phase
from agent.deploy.policy import resolve_policy
from agent.protocol import topics
from agent.protocol.messages import Command, encode
from agent.protocol.states import DEPLOY_STATES, IN_PROGRESS, TERMINAL, p95_limit_ms, p95_regressed
from agent.transport.fake import FakeTransport
from fleet.publish import announcement
from tests.agent_helpers import make_artifact, make_keys, sealed_command, sealed_for, write_config

RESTING = (Phase.IDLE, *(Phase(s) for s in TERMINAL))


def test_table_is_whole() -> None:
    assert set(TABLE) == set(Phase)
    reached = {Phase.IDLE}
    todo = [Phase.IDLE]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert reached == set(Phase)
    for p in Phase:  # every attempt can end: a resting phase is reachable from everywhere
        seen, todo = {p}, [p]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & set(RESTING), p
    # the events carry the public names; every public name is some phase's event
    assert {s.event for s in TABLE.values()} - {None} == set(DEPLOY_STATES)
    assert {p for p, s in TABLE.items() if s.persisted} == {
        Phase.VERIFIED,
        Phase.UNPACKED,
        Phase.SELF_TEST,
        Phase.ACTIVATING,
        Phase.PROBATION,
    }
    assert all(TABLE[Phase(s)].event == s for s in IN_PROGRESS)


def test_p95_rule() -> None:
    assert p95_limit_ms(10.0, 20.0, 0.5) == pytest.approx(12.5)
    assert not p95_regressed(12.5, 10.0, 20.0, 0.5)
    assert p95_regressed(12.51, 10.0, 20.0, 0.5)


def test_persisted_before_reported(tmp_path: Path) -> None:
    seen: list[tuple[str, Any]] = []
    m = Machine(
        tmp_path,
        lambda state, reason, subject, detail: seen.append(
            (
                state,
                json.loads((tmp_path / "install.json").read_text())
                if (tmp_path / "install.json").exists()
                else None,
            )
        ),
    )
    m.enter(Phase.FETCHING)
    m.enter(Phase.VERIFIED, sha256="a" * 64, previous="1.0.0-aaaa")
    m.enter(Phase.UNPACKED, dir="2.0.0-bbbb")
    assert seen[-1] == (
        "UNPACKED",
        {"sha256": "a" * 64, "dir": "2.0.0-bbbb", "state": "UNPACKED", "previous": "1.0.0-aaaa"},
    )
    m.enter(Phase.SELF_TEST)
    m.enter(Phase.ROLLED_BACK)
    assert seen[-1] == ("ROLLED_BACK", None) and m.illegal == []
    m.enter(Phase.PROBATION)  # not from a resting phase: logged and counted, never raised
    assert m.illegal == [(Phase.ROLLED_BACK, Phase.PROBATION)]


@pytest.mark.parametrize(
    ("state", "dir_", "resumes"),
    [
        ("PROBATION", "2.0.0-bbbb", Phase.PROBATION),  # written by agents before the machine
        ("ACTIVATING", "2.0.0-bbbb", Phase.PROBATION),  # killed after the symlink moved
        ("ACTIVATING", "3.0.0-cccc", Phase.IDLE),  # killed before it moved
        ("SELF_TEST", "2.0.0-bbbb", Phase.IDLE),
        ("VERIFIED", None, Phase.IDLE),
        ("BOGUS", "2.0.0-bbbb", Phase.IDLE),
    ],
)
def test_restart_resumes_from_install_json(
    tmp_path: Path, state: str, dir_: str | None, resumes: Phase
) -> None:
    (tmp_path / "install.json").write_text(
        json.dumps({"sha256": "b" * 64, "dir": dir_, "state": state, "previous": "1.0.0-aaaa"})
    )
    m = Machine(tmp_path, lambda *a: None)
    assert m.restore("2.0.0-bbbb") is resumes
    rec = InstallRecord.read(tmp_path / "install.json")
    if resumes is Phase.PROBATION:
        assert rec == InstallRecord("b" * 64, Phase.PROBATION, "2.0.0-bbbb", "1.0.0-aaaa")
    else:
        assert rec is None and not (tmp_path / "install.json").exists()


def _publish(fake: FakeTransport, art: Path) -> str:
    ann = announcement(art, 1024)
    data = art.read_bytes()
    for i in range(len(ann.chunks)):
        fake.retained[topics.artifact_chunk(ann.sha256, i)] = data[i * 1024 : (i + 1) * 1024]
    fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
    return ann.sha256


def test_a_deploy_and_a_rollback_take_only_listed_transitions(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    cfg = load_config(
        write_config(
            tmp_path / "agent.toml",
            "dev",
            "mqtt://127.0.0.1:1",
            [keys.public],
            tmp_path / "state",
            probation_s=0.0,
        )
    )
    fake = FakeTransport()
    agent = Agent(cfg, resolve_policy(cfg), fake)
    phases: list[Phase] = []
    report = agent.machine.report
    agent.machine.report = lambda *a: (phases.append(agent.machine.phase), report(*a))[1]
    agent.start()
    for version, seed in (("1.0.0", 0), ("1.1.0", 1)):
        sha = _publish(fake, make_artifact(tmp_path, keys, version=version, seed=seed))
        fake.inject(
            topics.device_topic("dev", "deployment"),
            sealed_for(fake.retained[topics.artifact_manifest(sha)], "tiny", version, device="dev"),
            retain=True,
        )
        agent.drain()
        agent.step(0)
        assert agent.active is not None and agent.active.sha256 == sha
        assert agent.machine.phase is Phase.HEALTHY
    fake.inject(
        topics.device_topic("dev", "cmd"), sealed_command("dev", Command(id="c1", op="rollback"))
    )
    agent.drain()
    assert agent.machine.phase is Phase.ROLLED_BACK and agent.machine.illegal == []
    assert not (tmp_path / "state" / "install.json").exists()
    deduped = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert deduped == [
        Phase.FETCHING,
        Phase.VERIFIED,
        Phase.UNPACKED,
        Phase.SELF_TEST,
        Phase.PROBATION,
        Phase.HEALTHY,
    ] * 2 + [Phase.ROLLED_BACK]
