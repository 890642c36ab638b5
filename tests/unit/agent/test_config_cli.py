"""Config validation names file and key; the CLI prints one-line errors; status reads the state dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.errors import ConfigError
from tests.agent_helpers import make_keys, write_config


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    keys = make_keys(tmp_path / "k")
    return write_config(
        tmp_path / "agent.toml",
        "dev-1",
        "mqtt://127.0.0.1:1883",
        [keys.public],
        tmp_path / "state",
        groups=("lab",),
    )


def test_valid_config_and_relative_paths(cfg_path: Path) -> None:
    cfg = load_config(cfg_path)
    assert cfg.device_id == "dev-1" and cfg.groups == ["lab"] and cfg.broker.port == 1883
    text = cfg_path.read_text().replace(str(cfg_path.parent / "state"), "state")
    cfg_path.write_text(text)
    assert load_config(cfg_path).state_dir == cfg_path.parent / "state"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("keep_versions = 1", "keep_versions = 1\nkeep_version = 3"), "keep_version: unknown key"),
        (('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"'), "broker.url"),
        (("window = 8", 'window = "big"'), "transfer.window"),
        (('device_id = "dev-1"', 'device_id = "a/b"'), "device_id"),
        (("[broker]", '[broker]\ncert_file = "c.pem"'), "broker"),
    ],
)
def test_errors_name_file_and_key(cfg_path: Path, edit: tuple[str, str], message: str) -> None:
    cfg_path.write_text(cfg_path.read_text().replace(*edit))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg_path)
    assert str(cfg_path) in str(exc.value) and message in str(exc.value)


def test_mqtts_with_files(cfg_path: Path, tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    text = cfg_path.read_text().replace(
        'url = "mqtt://127.0.0.1:1883"',
        'url = "mqtts://broker.lan"\nca_file = "ca.pem"\ncert_file = "c.pem"\n'
        'key_file = "k.pem"\nusername = "u"\npassword = "p"',
    )
    cfg_path.write_text(text)
    b = load_config(cfg_path).broker
    assert b.tls and b.port == 8883 and b.ca_file == tmp_path / "ca.pem"


def test_cli_check_config_and_status(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(cfg_path)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = cfg_path.with_name("bad.toml")
    bad.write_text(cfg_path.read_text() + "\nsurprise = 1\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "surprise: unknown key" in err and "Traceback" not in err
    assert (
        main(["status", "--config", str(cfg_path), "--json"]) == 2
    )  # no state yet: one-line error
    (cfg_path.parent / "state").mkdir()
    assert main(["status", "--config", str(cfg_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["active"] is None and doc["downloads"] == []
