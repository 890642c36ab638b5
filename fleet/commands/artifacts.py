"""`edgefleet artifacts list|prune`: what the broker retains, and clearing what nothing uses."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from fleet.commands.options import broker_from_options, broker_options

EPILOG = """\b
Examples:
  edgefleet artifacts list --broker mqtt://localhost:1883
  edgefleet artifacts prune --broker mqtt://localhost:1883 --keep 2 --dry-run
  edgefleet artifacts prune --broker mqtt://localhost:1883 --keep 2
"""


@click.group("artifacts", epilog=EPILOG)
def artifacts_grp() -> None:
    """Artifacts retained on the broker: list them with the deployments that name them, and
    prune the ones no deployment names (beyond the newest few per model line). Every retained
    artifact costs broker memory and is sent again on every bridge reconnect."""


def _scan(kw: dict[str, Any]) -> tuple[Any, Any]:
    from fleet.artifacts import scan
    from fleet.mqtt import connect

    c = connect(broker_from_options(kw))
    try:
        with click.progressbar(
            length=0, label="reading retained artifacts", file=sys.stderr, show_pos=True
        ) as bar:
            got = scan(c, progress=bar.update)
    except BaseException:
        c.close()
        raise
    return c, got


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"


@artifacts_grp.command("list", epilog=EPILOG)
@broker_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_cmd(as_json: bool, **kw: Any) -> None:
    """List the artifacts the broker retains: name, version, profile, sha256, size, chunks,
    when published, and which device and group deployments name each one (with whether the
    deployment is still valid or expired)."""
    from fleet.artifacts import inventory

    c, got = _scan(kw)
    c.close()
    inv = inventory(got)
    rows = sorted(
        (a.row() for a in inv.artifacts.values()),
        key=lambda r: (r["name"], r["profile"], r["version"]),
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "artifacts": rows,
                    "retained_bytes": sum(got.sizes.values()),
                    "warnings": inv.warnings,
                }
            )
        )
        return
    head = ("NAME", "VERSION", "PROFILE", "SHA256", "SIZE", "CHUNKS", "PUBLISHED", "DEPLOYED TO")
    table = [head]
    for r in rows:
        dep = ", ".join(
            d["target"] + (" (expired)" if d["expired"] else "") for d in r["deployed_to"]
        )
        chunks = str(r["chunks"]) + ("" if r["complete"] else " (incomplete)")
        table.append(
            (
                r["name"] or "?",
                r["version"] or "?",
                r["profile"] or "?",
                r["sha256"][:16],
                _mb(r["size"]),
                chunks,
                r["published"] or "-",
                dep or "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"{len(rows)} artifacts, {_mb(sum(got.sizes.values()))} retained")
    for w in inv.warnings:
        click.echo(f"warning: {w}", err=True)


@artifacts_grp.command("prune", epilog=EPILOG)
@broker_options
@click.option(
    "--keep",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Newest versions kept per model line (name + profile), besides every deployed one.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def prune_cmd(keep: int, dry_run: bool, as_json: bool, **kw: Any) -> None:
    """Remove retained artifacts (manifest, chunks, index entries) that no device or group
    deployment names, keeping the newest --keep per model line. A deployed artifact is never
    removed. A device fetching one that goes (deployed by a command, or since) gives up with
    a REJECTED event and keeps its model; publish and deploy it again to install it."""
    from agent.errors import BrokerError
    from fleet.artifacts import plan, prune

    c, got = _scan(kw)
    try:
        if got.dropped:
            raise BrokerError(
                f"the scan missed {got.dropped} retained messages (too many to read at once); "
                "nothing was removed"
            )
        p = plan(got, keep)
        before = sum(got.sizes.values())
        cleared: list[str] = []
        if not dry_run and p.remove:
            with click.progressbar(
                length=len(p.topics), label="clearing retained topics", file=sys.stderr
            ) as bar:
                p, cleared = prune(c, p, progress=bar.update)
    finally:
        c.close()
    out = {
        "dry_run": dry_run,
        "keep": keep,
        "remove": [a.row() for a in p.remove],
        "kept": [a.row() for a in p.keep],
        "topics": len(p.topics),
        "cleared": len(cleared),
        "bytes_freed": p.bytes_freed,
        "retained_bytes_before": before,
        "warnings": p.warnings,
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    verb = "would remove" if dry_run else "removed"
    for a in p.remove:
        click.echo(
            f"{verb} {a.name or '?'} {a.version or '?'} for {a.profile or '?'} "
            f"(sha256 {a.sha256[:16]}, {len(a.topics)} topics, {_mb(a.retained_bytes)})"
        )
    click.echo(
        f"{verb} {len(p.remove)} artifacts ({len(p.topics)} retained topics, "
        f"{_mb(p.bytes_freed)} of {_mb(before)}); kept {len(p.keep)}"
    )
    for w in p.warnings:
        click.echo(f"warning: {w}", err=True)
