"""`edgefleet demo`: the whole loop on this machine (see fleet/demo.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import click

from agent.errors import EdgefleetError


@click.command("demo")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("edgefleet-demo"),
    show_default=True,
    help="Working directory (artifacts, device state, logs, database, report).",
)
@click.option(
    "--devices",
    "n_devices",
    default=3,
    show_default=True,
    type=click.IntRange(2, 20),
    help="Agent processes to start (the last one serves the second profile).",
)
@click.option(
    "--broker-impl",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="auto: mosquitto when installed, else the embedded amqtt broker.",
)
@click.option(
    "--drift",
    is_flag=True,
    help="Then close the loop on the first group: its inputs shift, drift events, capture on, "
    "export, retrain and rebuild with the captured data, canary rollout, drift back under the "
    "threshold (about two minutes more).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON on stdout.")
def demo_cmd(out: Path, n_devices: int, broker_impl: str, drift: bool, as_json: bool) -> None:
    """Run a whole fleet on this machine: a broker, agent processes, the collector; build the
    digits example for two profiles, publish it, roll it out with a canary, upgrade it (the
    canary's p95 judged against the model it replaces), then watch a deliberately broken
    artifact be rejected and the rollout halt. Meanwhile a small application load calls each
    agent's v2 endpoint (counted in the summary). Ends with an HTML report.

    Every process it starts is stopped at the end or on Ctrl-C. Under a minute on a laptop.
    """
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=160)  # piped: don't wrap lines at 80 columns

    # Ctrl-C / SIGTERM raise KeyboardInterrupt, which unwinds through run_demo's cleanup. Code deep
    # in the build can swallow it (seen: an interrupt during an import turned into "onnxruntime is
    # not installed", or lost entirely), so the flag is also checked at every progress line.
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()
        raise KeyboardInterrupt

    def say(msg: str) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        console.print(msg, highlight=False, markup=False)

    signal.signal(signal.SIGTERM, on_signal)
    if (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, on_signal)
    try:
        from fleet.appload import describe
        from fleet.demo import run_demo

        summary = run_demo(out, n_devices, broker_impl, say, drift=drift)
    except EdgefleetError:
        if stopping.is_set():  # an error caused by the interrupt: report the interrupt
            _exit_interrupted()
        raise
    except KeyboardInterrupt:
        _exit_interrupted()
    if stopping.is_set():
        _exit_interrupted()
    if as_json:
        click.echo(json.dumps(summary))
        return
    from rich.table import Table

    t = Table(title=f"edgefleet demo: done in {summary['seconds']}s ({summary['broker']})")
    for col in (
        "device",
        "profile",
        "online",
        "active model",
        "p50",
        "p95",
        "app requests",
        "app failed",
    ):
        t.add_column(
            col, justify="right" if col in ("p50", "p95", "app requests", "app failed") else "left"
        )
    app = summary["app"]
    for d, s in summary["devices"].items():
        a = app["devices"].get(d, {})
        t.add_row(
            d,
            s["profile"],
            "yes" if s["online"] else "no",
            f"digits {s['active']}" if s["active"] else "-",
            *("-" if s.get(k) is None else f"{s[k]:.2f} ms" for k in ("p50_ms", "p95_ms")),
            str(a.get("requests", "-")),
            str(a.get("failed", "-")),
        )
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    click.echo(describe(app))
    for name, r in summary["rollouts"].items():
        click.echo(f"rollout {name}: {r['phase']}" + (f" - {r['reason']}" if r["reason"] else ""))
    click.echo(f"report: {summary['report']}")


def _exit_interrupted() -> NoReturn:
    """Exit 130 now that run_demo's cleanup has stopped every process. Not through the normal
    interpreter shutdown: a late signal (a second Ctrl-C, or SIGTERM from a supervisor) arriving
    after Python restored the default handlers killed the demo with -2 instead of 130."""
    click.echo("interrupted", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
