"""Options shared by the fleet commands: --broker with its TLS and login options, --db."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.broker import BrokerConfig
from agent.errors import UsageError
from fleet.mqtt import broker_config

DB_HELP = "Fleet database: a file path (SQLite) or postgresql://USER@HOST:PORT/DB."

F = TypeVar("F", bound=Callable[..., Any])


def broker_options_with(
    broker_help: str = "Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.",
    required: bool = True,
    multiple: bool = False,
) -> Callable[[F], F]:
    """--broker plus its TLS and login options, shared by every command that talks to a broker."""

    def deco(f: F) -> F:
        opts = [
            click.option(
                "--broker", required=required, default=None, multiple=multiple, help=broker_help
            ),
            click.option("--ca-file", default=None, help="CA certificate (PEM) for mqtts://."),
            click.option(
                "--cert-file", default=None, help="Client certificate (PEM) for mqtts://."
            ),
            click.option("--key-file", default=None, help="Client key (PEM) for mqtts://."),
            click.option(
                "--identity",
                default=None,
                envvar="EDGEFLEET_IDENTITY",
                help="Directory with ca.pem, cert.pem and key.pem (as written by "
                "'edgefleet broker init', e.g. broker/operator); sets the three files above "
                "(or $EDGEFLEET_IDENTITY).",
            ),
            click.option("--username", default=None, help="Broker user name."),
            click.option(
                "--password",
                default=None,
                envvar="EDGEFLEET_BROKER_PASSWORD",
                help="Broker password (or $EDGEFLEET_BROKER_PASSWORD).",
            ),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


broker_options = broker_options_with()


def identity_files(directory: str) -> tuple[str, str, str]:
    """ca.pem, cert.pem and key.pem of an identity directory; a missing one is a usage error."""
    d = Path(directory)
    files = tuple(str(d / n) for n in ("ca.pem", "cert.pem", "key.pem"))
    missing = [Path(f).name for f in files if not Path(f).is_file()]
    if missing:
        raise UsageError(f"--identity {directory}: no {', '.join(missing)} there")
    return files[0], files[1], files[2]


def broker_from_options(kw: dict[str, Any]) -> BrokerConfig:
    """The BrokerConfig of the broker options in ``kw`` (removed from it). --identity fills in
    whichever of --ca-file, --cert-file and --key-file were not given."""
    ca, cert, key = kw.pop("ca_file"), kw.pop("cert_file"), kw.pop("key_file")
    identity = kw.pop("identity", None)
    if identity:
        i_ca, i_cert, i_key = identity_files(identity)
        ca, cert, key = ca or i_ca, cert or i_cert, key or i_key
    return broker_config(kw.pop("broker"), ca, cert, key, kw.pop("username"), kw.pop("password"))


def operator_option(f: F) -> F:
    """--operator-key: the key that signs deployments and commands ($EDGEFLEET_OPERATOR_KEY)."""
    return click.option(
        "--operator-key",
        default=None,
        envvar="EDGEFLEET_OPERATOR_KEY",
        type=click.Path(dir_okay=False),
        help="Operator private key (PEM) that signs what devices act on "
        "(or $EDGEFLEET_OPERATOR_KEY; made by `edgefleet keys init-root`).",
    )(f)
