"""The builder's command group (profiles, passes, build, inspect) and its entry point
(`python -m builder.cli`); the `edgefleet` command (agent/clikit.py) gathers the group with the
fleet's. Each command's click layer is a module of builder/commands/."""

from __future__ import annotations

import sys

import click

from agent import __version__
from agent.clikit import run_cli
from builder.commands.build import build_cmd
from builder.commands.inspect_artifact import inspect_cmd
from builder.commands.passes import passes_cmd
from builder.commands.profiles import profiles_cmd

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT, commands=[profiles_cmd, passes_cmd, build_cmd, inspect_cmd])
@click.version_option(__version__, prog_name="edgefleet")
def cli() -> None:
    """edgefleet builder: compress a trained model for each kind of edge device, measure it
    against the fp32 original, and pack the candidate that meets the device's budgets into a
    signed artifact.

    \b
    Typical first steps:
      edgefleet profiles                      # the device kinds and their budgets
      edgefleet keys generate --out keys/     # a signing key pair
      edgefleet build edgefleet.toml --all-profiles --key keys/edgefleet.key
      edgefleet inspect out/NAME-VERSION-PROFILE.efa --key keys/edgefleet.pub
    """


def main(argv: list[str] | None = None) -> int:
    """The builder's commands alone (`edgefleet`, in agent/clikit.py, gathers them with the
    fleet's): user errors print one line and exit with their code; bugs keep tracebacks."""
    return run_cli(cli, argv, "edgefleet")


if __name__ == "__main__":
    sys.exit(main())
