"""`edgefleet profiles`: the device kinds a build can target, with their budgets."""

from __future__ import annotations

import json
from pathlib import Path

import click

from builder.commands.render import rich_console


@click.command("profiles")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory of profile .toml files (default: ./device_profiles or $EDGEFLEET_PROFILES).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_cmd(directory: Path | None, as_json: bool) -> None:
    """List device profiles with their runtime, candidates and budgets (validates every file)."""
    from agent.protocol.profile import load_profiles

    profiles = load_profiles(directory)
    if as_json:
        click.echo(json.dumps([p.model_dump(mode="json") for p in profiles.values()], indent=2))
        return
    from rich.table import Table

    t = Table(title="device profiles")
    for col in (
        "profile",
        "arch",
        "runtime",
        "threads",
        "candidates",
        "select",
        "max size",
        "max drop",
        "max p95",
        "max RAM",
    ):
        t.add_column(col)
    for p in profiles.values():
        b = p.budgets
        t.add_row(
            p.name,
            p.hardware.arch,
            p.runtime.name,
            str(p.runtime.threads),
            ", ".join(p.build.candidates),
            p.build.select,
            f"{b.max_artifact_kb:g} KB",
            f"{b.max_accuracy_drop_pt:g} pt",
            f"{b.max_p95_ms:g} ms",
            f"{b.max_ram_mb:g} MB",
        )
    rich_console(stderr=False).print(t)
