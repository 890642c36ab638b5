"""`edgefleet feedback export`: captured samples back into build data (fleet/feedback.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleet.commands.options import DB_HELP

TRIGGERS = ("sample", "low_confidence", "drift", "label")


@click.group("feedback")
def feedback_grp() -> None:
    """Samples the devices captured (opt-in), back into the next build."""


@click.command("export")
@click.option("--db", "db_target", required=True, help=DB_HELP)
@click.option("--model", required=True, help="Model name the samples were captured with.")
@click.option("--version", default=None, help="Only samples of this model version.")
@click.option(
    "--trigger",
    "triggers",
    multiple=True,
    type=click.Choice(TRIGGERS),
    help="Only samples captured for this reason (repeatable; default: all).",
)
@click.option(
    "--labelled-only", is_flag=True, help="Leave out unlabelled samples, so the file has labels y."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .npz to write; its summary goes beside it as OUT.json.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def export_cmd(
    db_target: str,
    model: str,
    version: str | None,
    triggers: tuple[str, ...],
    labelled_only: bool,
    out: Path,
    as_json: bool,
) -> None:
    """Write captured samples of a model as build data: one array per input, labels in y.

    \b
    Samples on axis 0 (each sample's batch rows in turn); y is written when every exported
    sample has a label (--labelled-only makes it so). Skipped and counted: samples captured
    without inputs (outputs only), and those whose inputs differ from the first one's in names,
    dtypes or shape beyond axis 0. Use the file as [data] train or calibration of edgefleet.toml.
    Example:
      edgefleet feedback export --db fleet.db --model digits --trigger low_confidence \\
          --labelled-only --out feedback.npz
    """
    from fleet.db import FleetDB
    from fleet.feedback import export, write

    db = FleetDB(db_target, readonly=True)
    try:
        exp = export(db, model, version, triggers, labelled_only)
    finally:
        db.close()
    side = write(exp, out)
    s = exp.summary()
    if as_json:
        click.echo(json.dumps(s))
        return
    arrays = ", ".join(f"{k} {v['dtype']} {tuple(v['shape'])}" for k, v in s["arrays"].items())
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(exp.skipped.items())) or "none"
    click.echo(f"wrote {out}: {exp.samples} samples, {exp.rows} rows: {arrays}")
    click.echo(f"labels: {exp.labels}; skipped: {skipped}")
    click.echo(f"by device: {dict(exp.devices)}; by trigger: {dict(exp.triggers)}")
    click.echo(f"summary: {side}")


@click.command("prune")
@click.option("--db", "db_target", required=True, help=DB_HELP)
@click.option("--model", required=True, help="Model name the samples were captured with.")
@click.option("--version", default=None, help="Only samples of this model version.")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0),
    default=None,
    help="Only samples the collector received more than this many days ago.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help='Print {"deleted": N, ...} on stdout.')
def prune_cmd(
    db_target: str,
    model: str,
    version: str | None,
    older_than_days: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Delete captured samples from the database (after export: samples can hold personal
    data). Example:
      edgefleet feedback prune --db fleet.db --model digits --older-than-days 30
    """
    from fleet.db import FleetDB
    from fleet.feedback import prune

    db = FleetDB(db_target)
    try:
        older = None if older_than_days is None else older_than_days * 86400.0
        n = prune(db, model, version, older, dry_run)
    finally:
        db.close()
    if as_json:
        click.echo(
            json.dumps({"model": model, "version": version, "deleted": n, "dry_run": dry_run})
        )
        return
    what = f"{model}" + (f" {version}" if version else "")
    click.echo(f"{'would delete' if dry_run else 'deleted'} {n} captured samples of {what}")


feedback_grp.add_command(export_cmd)
feedback_grp.add_command(prune_cmd)
