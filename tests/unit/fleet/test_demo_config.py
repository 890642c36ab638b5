"""The demo's agent configs load from a relative --out (the README's `edgefleet demo` default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from fleet.demo import _prepare_out, agent_config
from fleet.trust import provision
from tests.agent_helpers import make_keys


def test_agent_config_under_a_relative_out_names_files_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = _prepare_out(Path("edgefleet-demo"))
    assert run.is_absolute()
    keys = make_keys(tmp_path / "release", "edgefleet")
    trust = provision(run / "keys", [keys.public])
    cfg = load_config(agent_config(run, "dev-1", "x86-ipc", "mqtt://127.0.0.1:1", trust, 8001))
    assert cfg.root_key == trust.root_pub and cfg.trust_file == trust.trust
    assert cfg.state_dir == run / "devices" / "dev-1" / "state"
