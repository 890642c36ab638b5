"""`edgefleet collect` and `edgefleet fleet status|watch|report` (registered in the edgefleet CLI)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import click

from agent.errors import DatabaseError, UsageError
from fleet.commands import _broker, broker_options, broker_options_with

DB_HELP = "Fleet database: a file path (SQLite) or postgresql://USER@HOST:PORT/DB."


def _stop_on_sigterm(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)


@click.command("collect")
@broker_options
@click.option("--db", "db_target", required=True, help=DB_HELP)
@click.option("--share-group", default=None,
              help="Share the telemetry/events stream with other collectors in this group "
                   "(MQTT shared subscription: each message goes to one of them).")
@click.option("--client-id", default=None,
              help="MQTT client id; keep it stable so the broker holds messages while the collector is "
                   "down (default: derived from host, --db and --share-group). Unique per collector.")
@click.option("--batch", "batch_max", default=5000, show_default=True, type=click.IntRange(1, 100_000),
              help="Most messages written per transaction.")
@click.option("--stats-every", default=10.0, show_default=True, type=click.FloatRange(0.5, None),
              help="Seconds between progress lines.")
@click.option("--json-stats", is_flag=True, help="Print progress and the final counters as JSON lines on stdout.")
@click.option("--for", "duration", default=0.0, type=click.FloatRange(0, None),
              help="Stop after this many seconds (default: run until Ctrl-C or SIGTERM).")
def collect_cmd(db_target: str, share_group: str | None, client_id: str | None, batch_max: int,
                stats_every: float, json_stats: bool, duration: float, **kw: Any) -> None:
    """Store every device's state, events, telemetry and command results in a database.

    \b
    Runs until Ctrl-C or SIGTERM, then writes what it holds and exits. Messages that arrive
    while it is stopped wait on the broker (persistent session, QoS 1) and are stored when it
    starts again with the same --client-id. Examples:
      edgefleet collect --broker mqtt://broker.lan:1883 --db fleet.db
      edgefleet collect --broker mqtt://broker.lan:1883 --db postgresql://edge@db/fleet --share-group collectors
    """
    from fleet.collect import Collector
    from fleet.db import FleetDB

    broker = _broker(kw)
    db = FleetDB(db_target)
    try:
        col = Collector(broker, db, share_group=share_group, client_id=client_id, batch_max=batch_max)
        col.start()
    except BaseException:
        db.close()
        raise
    stop = threading.Event()
    _stop_on_sigterm(stop)
    click.echo(f"collecting from {broker.url} into {db.label} as client '{col.client_id}'"
               + (f", share group '{share_group}'" if share_group else "") + " (Ctrl-C stops)", err=True)
    t0 = time.monotonic()
    interrupted = False

    def report(final: bool = False) -> None:
        s = col.stats
        if json_stats:
            click.echo(json.dumps({"final": final, **s.as_dict()}))
        else:
            click.echo(f"received {s.received}, stored {s.stored}, duplicates {s.duplicates}, "
                       f"rejected {s.rejected}" + (" (stopped)" if final else ""), err=True)

    try:
        next_report = t0 + stats_every
        while not stop.is_set() and not col.wait(0.2):
            now = time.monotonic()
            if duration and now - t0 >= duration:
                break
            if now >= next_report:
                report()
                next_report = now + stats_every
    except KeyboardInterrupt:
        interrupted = True
    col.stop()
    report(final=True)
    if col.failed:
        raise DatabaseError(col.failed)
    if interrupted:
        raise click.exceptions.Exit(0)


@click.group("fleet")
def fleet_grp() -> None:
    """Look at the fleet: a table of devices (status, watch) and an HTML report."""


def _source(broker_url: str | None, db_target: str | None) -> None:
    if (broker_url is None) == (db_target is None):
        raise UsageError("give exactly one of --broker URL (live) or --db PATH (what a collector stored)")


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
    return broker_options_with("Broker URL: read retained state and live telemetry.", required=False)(f)


@fleet_grp.command("status")
@_source_options
@click.option("--listen", default=3.0, show_default=True, type=click.FloatRange(0.2, 600),
              help="With --broker: seconds to listen for telemetry before printing.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
def status_cmd(db_target: str | None, listen: float, as_json: bool, **kw: Any) -> None:
    """One row per device: online/offline, profile, active model, last p50/p95, RSS, CPU, max
    temperature, throttling and when it was last heard from."""
    from fleet.view import LiveFleet, render_table, rows_json

    _source(kw["broker"], db_target)
    if db_target is not None:
        rows = _db_rows(db_target)
    else:
        live = LiveFleet(_broker(kw)).start()
        try:
            time.sleep(listen)
            rows = live.snapshot()
        finally:
            live.close()
    if as_json:
        click.echo(rows_json(rows))
    else:
        _console().print(render_table(rows))


@fleet_grp.command("watch")
@_source_options
@click.option("--refresh", default=1.0, show_default=True, type=click.FloatRange(0.2, 3600),
              help="Seconds between refreshes of the table.")
@click.option("--for", "duration", default=0.0, type=click.FloatRange(0, None),
              help="Stop after this many seconds (default: until Ctrl-C).")
def watch_cmd(db_target: str | None, refresh: float, duration: float, **kw: Any) -> None:
    """A live table of the fleet that refreshes in place (Ctrl-C exits)."""
    from rich.live import Live

    from fleet.view import LiveFleet, render_table

    _source(kw["broker"], db_target)
    live_fleet = LiveFleet(_broker(kw)).start() if db_target is None else None

    def rows() -> list[Any]:
        return live_fleet.snapshot() if live_fleet is not None else _db_rows(db_target or "")

    stop = threading.Event()
    _stop_on_sigterm(stop)
    t0 = time.monotonic()
    try:
        with Live(render_table(rows()), console=_console(), refresh_per_second=4, transient=False) as live:
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
@click.option("--html", "out", required=True, type=click.Path(path_type=Path), help="Where to write the page.")
@click.option("--json", "as_json", is_flag=True, help="Print the fleet summary as JSON.")
def report_cmd(db_target: str, out: Path, as_json: bool) -> None:
    """Write one self-contained HTML page (no network needed): fleet summary, per-device plots of
    latency, temperature and memory, and the deployment history with outcomes and reasons."""
    from fleet.db import FleetDB
    from fleet.report import write_report

    db = FleetDB(db_target, readonly=True)
    try:
        s = write_report(db, out)
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps({"html": str(out), **s}))
    else:
        click.echo(f"wrote {out}: {s['devices']} devices, {s['telemetry_messages']} telemetry messages, "
                   f"{sum(s['deployments'].values())} deployments")
