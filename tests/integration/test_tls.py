"""mqtts:// with a CA, a client certificate and a user name/password, end to end."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import topics
from fleet.deploy import deploy
from fleet.mqtt import broker_config
from fleet.publish import publish_artifact
from tests.agent_helpers import AgentProcess, Broker, operator, write_config

pytestmark = pytest.mark.integration


def _cert(
    tmp: Path, name: str, issuer: tuple[Any, x509.Name] | None, server: bool = False
) -> tuple[Any, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1] if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    if issuer is None:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    cert = b.sign(issuer[0] if issuer else key, hashes.SHA256())
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return key, subject


@pytest.fixture
def tls_broker(tmp_path: Path) -> Any:
    d = tmp_path / "tls"
    d.mkdir()
    ca = _cert(d, "ca", None)
    _cert(d, "server", ca, server=True)
    _cert(d, "client", ca)
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(d / "pw"), "dev", "s3cret"],
        check=True,
        capture_output=True,
    )
    b = Broker(d)
    b.conf.write_text(
        b.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        + f"cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n"
        f"require_certificate true\npassword_file {d}/pw\n"
    )
    b.start()
    yield b, d
    b.stop()


def test_agent_over_mqtts(tls_broker: Any, tmp_path: Path, keys: Any, artifacts: Any) -> None:
    broker, d = tls_broker
    url = f"mqtts://127.0.0.1:{broker.port}"
    cfg = write_config(tmp_path / "agent.toml", "tls1", url, [keys.public], tmp_path / "state")
    cfg.write_text(
        cfg.read_text().replace(
            f'url = "{url}"',
            f'url = "{url}"\nca_file = "{d}/ca.pem"\ncert_file = "{d}/client.pem"\n'
            f'key_file = "{d}/client.key"\nusername = "dev"\npassword = "s3cret"',
        )
    )
    healthy = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.tls_set(
        ca_certs=str(d / "ca.pem"), certfile=str(d / "client.pem"), keyfile=str(d / "client.key")
    )
    c.username_pw_set("dev", "s3cret")
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topics.device_topic("tls1", "events"), 1)
    c.on_message = lambda cl, u, m: (
        healthy.set() if json.loads(m.payload).get("state") == "HEALTHY" else None
    )
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        bc = broker_config(
            url, str(d / "ca.pem"), str(d / "client.pem"), str(d / "client.key"), "dev", "s3cret"
        )
        sha = publish_artifact(artifacts(version="1.0.0"), bc, chunk_size=4096).sha256
        res = deploy(bc, "tiny@1.0.0", operator(), device="tls1")
        assert res.deployment.sha256 == sha
        assert healthy.wait(30), (tmp_path / "agent.log").read_text()[-2000:]
    finally:
        agent.stop()
        c.disconnect()
        c.loop_stop()
