"""The agent's state/event seq keeps increasing across restarts, however few messages a run sent."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import load_config
from agent.deploy.agent import Agent
from agent.deploy.policy import resolve_policy
from agent.transport.fake import FakeTransport
from tests.agent_helpers import make_keys, write_config


def _seqs(fake: FakeTransport) -> list[int]:
    return [
        int(json.loads(p)["seq"]) for t, p, _ in fake.published if t.endswith(("/events", "/state"))
    ]


def test_seq_increases_across_restarts(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    cfg = load_config(
        write_config(
            tmp_path / "agent.toml", "dev", "mqtt://127.0.0.1:1", [keys.public], tmp_path / "state"
        )
    )
    sent: list[int] = []
    for run, n in enumerate((3, 70, 1, 0, 2)):  # short runs, and one past a periodic save
        fake = FakeTransport()
        agent = Agent(cfg, resolve_policy(cfg), fake)
        for i in range(n):
            agent.out.event("info", reason=f"run {run} message {i}")
        agent.publish_state()
        seqs = _seqs(fake)
        assert len(seqs) == n + 1 and seqs == sorted(seqs)
        assert not sent or seqs[0] > max(sent), (run, seqs[0], max(sent))
        sent += seqs
