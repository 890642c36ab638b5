"""`edgefleet fleet status|watch|report`: the fleet as a table (live or from the database) and
as an HTML report."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import click

from agent.errors import UsageError
from fleet.commands.collect import stop_on_sigterm
from fleet.commands.options import DB_HELP, broker_from_options, broker_options_with


@click.group("fleet")
def fleet_grp() -> None:
    """Look at the fleet: a table of devices (status, watch) and an HTML report."""


def _source(broker_url: str | None, db_target: str | None) -> None:
    if (broker_url is None) == (db_target is None):
        raise UsageError(
            "give exactly one of --broker URL (live) or --db PATH (what a collector stored)"
        )


def _console() -> Any:
    """A rich console; when piped, 160 columns wide rather than cut to 80."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def _db_rows(db_target: str) -> list[Any]:
    from fleet.db import FleetDB
    from fleet.view import rows_from_db

    db = FleetDB(db_target, readonly=True)
    try:
        return rows_from_db(db)
    finally:
        db.close()


def _source_options(f: Any) -> Any:
    f = click.option("--db", "db_target", default=None, help=DB_HELP + " (instead of --broker)")(f)
    return broker_options_with(
        "Broker URL: read retained state and live telemetry.", required=False
    )(f)


DEFAULT_LISTEN_S = 12.0  # the agent's default telemetry interval (10 s) and some slack
RETAINED_S = 1.0  # enough for the retained state messages of a fleet


@fleet_grp.command("status")
@_source_options
@click.option(
    "--listen",
    default=None,
    type=click.FloatRange(0.2, 3600),
    help="With --broker: listen this many seconds (default: until every online device "
    "has sent telemetry, at most one default telemetry interval, 12 s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
def status_cmd(db_target: str | None, listen: float | None, as_json: bool, **kw: Any) -> None:
    """One row per device: online/offline, profile, active model, last p50/p95, RSS, CPU, max
    temperature, throttling, model drift (the latest monitor window's max drift score, marked
    ⚠ when the device judged it drifting) and mean confidence, and when it was last heard from."""
    from fleet.view import LiveFleet, render_table, rows_json

    _source(kw["broker"], db_target)
    if db_target is not None:
        rows = _db_rows(db_target)
    else:
        live = LiveFleet(broker_from_options(kw)).start()
        try:
            t0 = time.monotonic()
            limit = listen if listen is not None else DEFAULT_LISTEN_S
            time.sleep(min(RETAINED_S, limit))  # the retained states arrive first
            while time.monotonic() - t0 < limit and (listen is not None or live.waiting_for()):
                time.sleep(0.2)
            missing = live.waiting_for()
            rows = live.snapshot()
        finally:
            live.close()
        if missing:
            click.echo(
                f"note: no telemetry within {time.monotonic() - t0:.0f}s from {', '.join(missing)} "
                "(online, but their latency and load columns are empty; a longer --listen may "
                "see them)",
                err=True,
            )
    if as_json:
        click.echo(rows_json(rows))
    else:
        _console().print(render_table(rows))


@fleet_grp.command("watch")
@_source_options
@click.option(
    "--refresh",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.2, 3600),
    help="Seconds between refreshes of the table.",
)
@click.option(
    "--for",
    "duration",
    default=0.0,
    type=click.FloatRange(0, None),
    help="Stop after this many seconds (default: until Ctrl-C).",
)
def watch_cmd(db_target: str | None, refresh: float, duration: float, **kw: Any) -> None:
    """A live table of the fleet that refreshes in place (Ctrl-C exits)."""
    from rich.live import Live

    from fleet.view import LiveFleet, render_table

    _source(kw["broker"], db_target)
    live_fleet = LiveFleet(broker_from_options(kw)).start() if db_target is None else None

    def rows() -> list[Any]:
        return live_fleet.snapshot() if live_fleet is not None else _db_rows(db_target or "")

    stop = threading.Event()
    stop_on_sigterm(stop)
    t0 = time.monotonic()
    try:
        with Live(
            render_table(rows()), console=_console(), refresh_per_second=4, transient=False
        ) as live:
            while not stop.wait(refresh):
                live.update(render_table(rows()))
                if duration and time.monotonic() - t0 >= duration:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if live_fleet is not None:
            live_fleet.close()


@fleet_grp.command("report")
@click.option("--db", "db_target", required=True, help=DB_HELP)
@click.option(
    "--html", "out", required=True, type=click.Path(path_type=Path), help="Where to write the page."
)
@click.option("--json", "as_json", is_flag=True, help="Print the fleet summary as JSON.")
def report_cmd(db_target: str, out: Path, as_json: bool) -> None:
    """Write one self-contained HTML page (no network needed): fleet summary, per-device plots of
    latency, temperature, memory, model drift and confidence, the deployment history with
    outcomes and reasons, and the drift episodes."""
    from fleet.db import FleetDB
    from fleet.fleet_report import write_report

    db = FleetDB(db_target, readonly=True)
    try:
        s = write_report(db, out)
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps({"html": str(out), **s}))
    else:
        click.echo(
            f"wrote {out}: {s['devices']} devices, {s['telemetry_messages']} telemetry messages, "
            f"{sum(s['deployments'].values())} deployments"
        )
