"""broker init / add-device: certificates, key modes, mosquitto.conf and the ACL they render."""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.errors import UsageError
from fleet import certs
from fleet.broker_init import (
    COLLECTOR,
    OPERATOR,
    Registry,
    add_device,
    agent_snippet,
    init_broker,
    render_acl,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _allowed(acl: str, user: str, access: str, topic: str) -> bool:
    """mosquitto's rules for an ACL file: the user's own lines, then every pattern with %u."""
    current = None
    for line in acl.splitlines():
        if line.startswith("user "):
            current = line.split(" ", 1)[1]
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("topic", "pattern"):
            continue
        kind, acc, filt = parts
        if kind == "topic" and current != user:
            continue
        filt = filt.replace("%u", user)
        if acc in ("readwrite", access) and mqtt.topic_matches_sub(filt, topic):
            return True
    return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("b") / "broker"
    init_broker(d, ["broker.lan", "10.0.0.5"], 18883, "127.0.0.1", {"dev-a": ["lab"], "dev-b": []})
    return d


def test_certificates_chain_to_the_ca_with_the_right_names(setup: Path) -> None:
    ca = _cert(setup / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(setup / "server.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for sub, cn in (("operator", OPERATOR), ("collector", COLLECTOR), ("devices/dev-a", "dev-a")):
        c = _cert(setup / sub / "cert.pem")
        assert certs.common_name(c) == cn
        c.verify_directly_issued_by(ca)
        eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (setup / sub / "ca.pem").read_bytes() == (setup / "ca.pem").read_bytes()
        # Python's ssl (what paho uses) loads the pair
        ssl.create_default_context().load_cert_chain(
            setup / sub / "cert.pem", setup / sub / "key.pem"
        )


def test_private_keys_are_0600(setup: Path) -> None:
    keys = [setup / "ca.key", setup / "server.key", *setup.glob("**/key.pem")]
    assert len(keys) == 6
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600, k


def test_mosquitto_conf_is_tls_only_with_client_certificates(setup: Path) -> None:
    conf = (setup / "mosquitto.conf").read_text().splitlines()
    for line in (
        "listener 18883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "tls_version tlsv1.2",
        f"acl_file {setup.resolve()}/acl",
        f"cafile {setup.resolve()}/ca.pem",
    ):
        assert line in conf
    assert not [
        ln
        for ln in conf
        if ln.startswith("listener") and ln != conf[conf.index("listener 18883 127.0.0.1")]
    ]


P = "edgefleet/v1"


@pytest.mark.parametrize(
    ("user", "access", "topic", "ok"),
    [
        ("dev-a", "write", f"{P}/devices/dev-a/state", True),
        ("dev-a", "write", f"{P}/devices/dev-a/cmd/result", True),
        ("dev-a", "write", f"{P}/devices/dev-a/samples", True),
        ("dev-b", "write", f"{P}/devices/dev-a/samples", False),
        ("dev-a", "read", f"{P}/devices/dev-a/cmd", True),
        ("dev-a", "read", f"{P}/devices/dev-a/deployment", True),
        ("dev-a", "read", f"{P}/groups/lab/deployment", True),
        ("dev-a", "read", f"{P}/artifacts/{'a' * 64}/chunks/3", True),
        ("dev-a", "read", f"{P}/trust", True),
        ("dev-b", "write", f"{P}/devices/dev-a/state", False),
        ("dev-b", "write", f"{P}/devices/dev-a/telemetry", False),
        ("dev-b", "read", f"{P}/devices/dev-a/cmd", False),
        ("dev-b", "read", f"{P}/devices/dev-a/deployment", False),
        ("dev-b", "read", f"{P}/groups/lab/deployment", False),
        ("dev-a", "write", f"{P}/devices/dev-a/deployment", False),
        ("dev-a", "write", f"{P}/devices/dev-a/cmd", False),
        ("dev-a", "write", f"{P}/trust", False),
        ("dev-a", "write", f"{P}/artifacts/x/manifest", False),
        ("dev-a", "write", f"{P}/groups/lab/deployment", False),
        (OPERATOR, "write", f"{P}/groups/lab/deployment", True),
        (OPERATOR, "read", f"{P}/devices/dev-b/events", True),
        (COLLECTOR, "read", f"{P}/devices/dev-b/telemetry", True),
        (COLLECTOR, "read", f"{P}/devices/dev-b/cmd/result", True),
        (COLLECTOR, "read", f"{P}/devices/dev-b/samples", True),
        (COLLECTOR, "read", f"{P}/devices/dev-b/cmd", False),
        (COLLECTOR, "read", f"{P}/artifacts/x/manifest", False),
        (COLLECTOR, "write", f"{P}/devices/dev-b/telemetry", False),
        ("stranger", "read", f"{P}/artifacts/x/manifest", False),
    ],
)
def test_acl(setup: Path, user: str, access: str, topic: str, ok: bool) -> None:
    assert _allowed((setup / "acl").read_text(), user, access, topic) is ok


def test_add_device_rewrites_the_acl_and_refuses_twice(tmp_path: Path) -> None:
    d = tmp_path / "b"
    init_broker(d, port=18883)
    add_device(d, "dev-c", ["north", "lab"])
    acl = (d / "acl").read_text()
    assert _allowed(acl, "dev-c", "read", f"{P}/groups/north/deployment")
    assert json.loads((d / "broker.json").read_text())["devices"] == {"dev-c": ["lab", "north"]}
    with pytest.raises(UsageError, match="already has a certificate"):
        add_device(d, "dev-c")
    first = (d / "devices/dev-c/cert.pem").read_bytes()
    add_device(d, "dev-c", ["south"], force=True)
    acl = (d / "acl").read_text()
    assert (d / "devices/dev-c/cert.pem").read_bytes() != first
    assert _allowed(acl, "dev-c", "read", f"{P}/groups/south/deployment")
    assert not _allowed(acl, "dev-c", "read", f"{P}/groups/north/deployment")
    assert acl.count("user dev-c") == 1


def test_init_refuses_an_existing_setup_unless_forced(tmp_path: Path) -> None:
    d = tmp_path / "b"
    init_broker(d)
    ca = (d / "ca.pem").read_bytes()
    with pytest.raises(UsageError, match="already holds a broker setup"):
        init_broker(d)
    assert (d / "ca.pem").read_bytes() == ca
    init_broker(d, force=True)
    assert (d / "ca.pem").read_bytes() != ca


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"devices": {"a/b": []}}, "device id"),
        ({"devices": {"edgefleet:operator": []}}, "device id"),
        ({"devices": {"a": ["lab/#"]}}, "group"),
        ({"hosts": ["bad host"]}, "--host"),
        ({"port": 0}, "--port"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path: Path, kw: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(UsageError, match=match):
        init_broker(tmp_path / "b", **kw)
    assert not (tmp_path / "b" / "ca.key").exists()


def test_agent_snippet_is_the_broker_table() -> None:
    import tomllib

    reg = Registry(["::1"], 8883, devices={"dev-a": ["lab"]})
    doc = tomllib.loads(agent_snippet(reg, "dev-a", "/etc/ef"))
    assert doc["broker"] == {
        "url": "mqtts://[::1]:8883",
        "ca_file": "/etc/ef/ca.pem",
        "cert_file": "/etc/ef/cert.pem",
        "key_file": "/etc/ef/key.pem",
    }
    from agent.broker import BrokerConfig

    assert BrokerConfig(**doc["broker"]).host == "::1"


def test_render_acl_lists_no_device_without_groups_twice() -> None:
    acl = render_acl(Registry(["localhost"], 8883))
    assert "user " + OPERATOR in acl and "pattern write edgefleet/v1/devices/%u/state" in acl


def test_cli_json_and_errors(tmp_path: Path) -> None:
    from fleet.commands import cli

    r = CliRunner().invoke(
        cli,
        ["broker", "init", "--dir", str(tmp_path / "b"), "--device", "rpi-1:lab,north", "--json"],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["devices"]["rpi-1"]["groups"] == ["lab", "north"]
    assert doc["operator"]["name"] == OPERATOR
    assert "[broker]" in doc["devices"]["rpi-1"]["agent_broker_toml"]
    r = CliRunner().invoke(cli, ["broker", "add-device", "rpi-2", "--dir", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "kill -HUP" in r.output and 'url = "mqtts://localhost:8883"' in r.output
    r = CliRunner().invoke(cli, ["broker", "add-device", "rpi-2", "--dir", str(tmp_path / "b")])
    assert isinstance(r.exception, UsageError)


def test_identity_option_fills_the_tls_files(setup: Path, tmp_path: Path) -> None:
    from fleet.commands.options import broker_from_options

    base = {"broker": "mqtts://localhost:18883", "username": None, "password": None}
    kw = {
        **base,
        "ca_file": None,
        "cert_file": None,
        "key_file": None,
        "identity": str(setup / "operator"),
    }
    cfg = broker_from_options(kw)
    assert (
        cfg.cert_file == setup / "operator" / "cert.pem"
        and cfg.ca_file == setup / "operator" / "ca.pem"
    )
    kw = {
        **base,
        "ca_file": "/x/ca.pem",
        "cert_file": None,
        "key_file": None,
        "identity": str(setup / "operator"),
    }
    assert broker_from_options(kw).ca_file == Path("/x/ca.pem")  # an explicit option wins
    kw = {**base, "ca_file": None, "cert_file": None, "key_file": None, "identity": str(tmp_path)}
    with pytest.raises(UsageError, match=r"no ca\.pem, cert\.pem, key\.pem"):
        broker_from_options(kw)
