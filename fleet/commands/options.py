"""Options shared by the fleet commands: --broker with its TLS and login options, --db."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from agent.broker import BrokerConfig
from fleet.mqtt import broker_config

DB_HELP = "Fleet database: a file path (SQLite) or postgresql://USER@HOST:PORT/DB."

F = TypeVar("F", bound=Callable[..., Any])


def broker_options_with(
    broker_help: str = "Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.", required: bool = True
) -> Callable[[F], F]:
    """--broker plus its TLS and login options, shared by every command that talks to a broker."""

    def deco(f: F) -> F:
        opts = [
            click.option("--broker", required=required, default=None, help=broker_help),
            click.option("--ca-file", default=None, help="CA certificate (PEM) for mqtts://."),
            click.option(
                "--cert-file", default=None, help="Client certificate (PEM) for mqtts://."
            ),
            click.option("--key-file", default=None, help="Client key (PEM) for mqtts://."),
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


def broker_from_options(kw: dict[str, Any]) -> BrokerConfig:
    """The BrokerConfig of the broker options in ``kw`` (removed from it)."""
    return broker_config(
        kw.pop("broker"),
        kw.pop("ca_file"),
        kw.pop("cert_file"),
        kw.pop("key_file"),
        kw.pop("username"),
        kw.pop("password"),
    )


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
