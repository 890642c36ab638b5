"""Where profiles are found: $EDGEFLEET_PROFILES, ./device_profiles, else the ones shipped in
the package (what a wheel install has; .ci/wheel checks the installed wheel itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.profile import SHIPPED_PROFILES_DIR, default_profiles_dir, load_profiles
from tests.conftest import ROOT


def test_shipped_profiles_are_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_profiles_dir() == SHIPPED_PROFILES_DIR
    assert {"rpi4", "jetson-orin-nano", "x86-ipc", "generic-cpu"} <= set(load_profiles())


def test_env_then_cwd_take_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)
    (tmp_path / "device_profiles").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default_profiles_dir() == tmp_path / "device_profiles"
    monkeypatch.setenv("EDGEFLEET_PROFILES", str(tmp_path / "elsewhere"))
    assert default_profiles_dir() == tmp_path / "elsewhere"


def test_the_checkout_link_is_the_shipped_directory() -> None:
    assert (ROOT / "device_profiles").resolve() == SHIPPED_PROFILES_DIR
