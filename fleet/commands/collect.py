"""`edgefleet collect`: every device's messages into the fleet database."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import click

from agent.errors import DatabaseError
from fleet.commands.options import DB_HELP, broker_from_options, broker_options


def stop_on_sigterm(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)


@click.command("collect")
@broker_options
@click.option("--db", "db_target", required=True, help=DB_HELP)
@click.option(
    "--share-group",
    default=None,
    help="Share the telemetry/events stream with other collectors in this group "
    "(MQTT shared subscription: each message goes to one of them).",
)
@click.option(
    "--client-id",
    default=None,
    help="MQTT client id; keep it stable so the broker holds messages while the collector is "
    "down (default: derived from host, --db and --share-group). Unique per collector.",
)
@click.option(
    "--batch",
    "batch_max",
    default=5000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most messages written per transaction.",
)
@click.option(
    "--max-sample-kb",
    default=4096,
    show_default=True,
    type=click.IntRange(1, 256 * 1024),
    help="Largest captured sample (devices/+/samples) stored; a larger one is refused, counted "
    "(samples_oversize) and logged once.",
)
@click.option(
    "--stats-every",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.5, None),
    help="Seconds between progress lines.",
)
@click.option(
    "--json-stats",
    is_flag=True,
    help="Print progress and the final counters as JSON lines on stdout.",
)
@click.option(
    "--for",
    "duration",
    default=0.0,
    type=click.FloatRange(0, None),
    help="Stop after this many seconds (default: run until Ctrl-C or SIGTERM).",
)
def collect_cmd(
    db_target: str,
    share_group: str | None,
    client_id: str | None,
    batch_max: int,
    max_sample_kb: int,
    stats_every: float,
    json_stats: bool,
    duration: float,
    **kw: Any,
) -> None:
    """Store every device's state, events, telemetry, command results and captured samples.

    \b
    Runs until Ctrl-C or SIGTERM, then writes what it holds and exits. Messages that arrive
    while it is stopped wait on the broker (persistent session, QoS 1) and are stored when it
    starts again with the same --client-id. Examples:
      edgefleet collect --broker mqtt://broker.lan:1883 --db fleet.db
      edgefleet collect --broker mqtt://broker.lan:1883 --db postgresql://edge@db/fleet --share-group collectors
    """
    from fleet.collect import Collector
    from fleet.db import FleetDB

    broker = broker_from_options(kw)
    db = FleetDB(db_target)
    try:
        col = Collector(
            broker,
            db,
            share_group=share_group,
            client_id=client_id,
            batch_max=batch_max,
            max_sample_bytes=max_sample_kb * 1024,
        )
        col.start()
    except BaseException:
        db.close()
        raise
    stop = threading.Event()
    stop_on_sigterm(stop)
    click.echo(
        f"collecting from {broker.url} into {db.label} as client '{col.client_id}'"
        + (f", share group '{share_group}'" if share_group else "")
        + " (Ctrl-C stops)",
        err=True,
    )
    t0 = time.monotonic()
    interrupted = False

    def report(final: bool = False) -> None:
        s = col.stats
        if json_stats:
            click.echo(json.dumps({"final": final, **s.as_dict()}))
        else:
            click.echo(
                f"received {s.received}, stored {s.stored}, duplicates {s.duplicates}, "
                f"rejected {s.rejected}" + (" (stopped)" if final else ""),
                err=True,
            )

    try:
        next_report = t0 + stats_every
        while not stop.is_set() and not col.wait(0.2):
            now = time.monotonic()
            if duration and now - t0 >= duration:
                break
            if (warning := col.share.warning()) is not None:
                click.echo(f"warning: {warning}", err=True)
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
