"""Fixtures for integration tests: a real mosquitto broker per test, keys, artifacts, agents."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_helpers import (
    AgentProcess,
    Broker,
    Keys,
    Listener,
    make_artifact,
    make_keys,
    write_config,
)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("otherkeys"), "other")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def listener(broker: Broker) -> Iterator[Listener]:
    lst = Listener(broker.url)
    yield lst
    lst.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Callable[..., Path]:
    """Factory: artifacts(version=..., profile=..., bad_golden=...) -> signed .efa (cached)."""
    out = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple[Any, ...], Path] = {}

    def make(**kw: Any) -> Path:
        k = tuple(sorted((n, str(v)) for n, v in kw.items()))
        if k not in cache:
            kw.setdefault("keys", keys)
            cache[k] = make_artifact(out, **kw)
        return cache[k]

    return make


class Agents:
    """Starts agent processes with their own config and state dir; stops them all at the end."""

    def __init__(self, tmp: Path, broker: Broker, keys: Keys) -> None:
        self.tmp, self.broker, self.keys = tmp, broker, keys
        self.procs: list[AgentProcess] = []
        self._n = itertools.count()

    def config(self, device: str, **kw: Any) -> Path:
        d = self.tmp / device
        d.mkdir(exist_ok=True)
        kw.setdefault("keys", [self.keys.public])
        return write_config(d / "agent.toml", device, self.broker.url, state_dir=d / "state", **kw)

    def state_dir(self, device: str) -> Path:
        return self.tmp / device / "state"

    def start(self, device: str, env: dict[str, str] | None = None, **kw: Any) -> AgentProcess:
        cfg = self.tmp / device / "agent.toml"
        if kw or not cfg.exists():
            cfg = self.config(device, **kw)
        p = AgentProcess(cfg, self.tmp / device / f"agent-{next(self._n)}.log", env).start()
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def agents(tmp_path: Path, broker: Broker, keys: Keys) -> Iterator[Agents]:
    a = Agents(tmp_path, broker, keys)
    yield a
    a.stop_all()
