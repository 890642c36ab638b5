"""Shared fixtures: a prepared copy of the digits example (trained once per session)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _hypothesis_profiles() -> None:
    """Property tests check correctness, not speed: on a loaded CI runner or under qemu a 200 ms
    deadline or the too-slow health check fails them for the machine's sake. The default profile
    drops both; HYPOTHESIS_PROFILE=strict restores hypothesis's own timing checks."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # an agent-only environment without the test extra
        return
    settings.register_profile(
        "machine-scaled",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("strict", deadline=200)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "machine-scaled"))


_hypothesis_profiles()


def _operator_env() -> None:
    """The test operator key for `edgefleet deploy`/`device cmd` run as subprocesses by tests
    (the agents the tests start trust it: tests/agent_helpers.py trust_root)."""
    try:
        from tests.agent_helpers import trust_root
    except ImportError:  # an environment without numpy/onnx helpers
        return
    os.environ.setdefault("EDGEFLEET_OPERATOR_KEY", str(trust_root() / "operator.key"))


_operator_env()


@dataclass
class DigitsProject:
    dir: Path
    config: Path
    work: Path
    private_key: Path
    public_key: Path


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsProject:
    """examples/digits copied to a temp dir with its data, trained weights and a key pair."""
    from examples.digits.prepare import prepare

    d = tmp_path_factory.mktemp("digits")
    for name in ("model.py", "edgefleet.toml"):
        shutil.copy(ROOT / "examples" / "digits" / name, d / name)
    src_work = ROOT / "examples" / "digits" / "work"
    work = d / "work"
    if (src_work / "digits_cnn.pt").exists() and (src_work / "eval.npz").exists():
        shutil.copytree(src_work, work, ignore=shutil.ignore_patterns("keys"))
    prepare(work, quiet=True)
    return DigitsProject(
        d,
        d / "edgefleet.toml",
        work,
        work / "keys" / "edgefleet.key",
        work / "keys" / "edgefleet.pub",
    )


@pytest.fixture
def profiles_dir() -> Path:
    return ROOT / "device_profiles"
