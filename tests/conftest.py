"""Shared fixtures: a prepared copy of the digits example (trained once per session)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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
    return DigitsProject(d, d / "edgefleet.toml", work, work / "keys" / "edgefleet.key", work / "keys" / "edgefleet.pub")


@pytest.fixture
def profiles_dir() -> Path:
    return ROOT / "device_profiles"
