"""Shared core: the CLI runner both command lines use (user errors are one line, bugs keep
tracebacks), and the `edgefleet` command, which gathers the builder's and the fleet's command
groups by name (`python -m agent.clikit` runs it from a checkout)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from agent import __version__
from agent.errors import EdgefleetError


def run_cli(group: click.Group, argv: list[str] | None, prog_name: str) -> int:
    """Run ``group``; map EdgefleetError to ``error: ...`` and its exit code, Ctrl-C to 130."""
    try:
        group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except EdgefleetError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


class GatheredGroup(click.Group):
    """A command group gathered from other packages' groups, each named "module:attr" and
    imported only when listed or run; a source whose import fails is skipped with one line
    naming the extra to install. The `edgefleet` command is one: builder and fleet never import
    each other, and neither needs the other installed."""

    def __init__(self, sources: list[tuple[str, str]], **kw: Any) -> None:
        super().__init__(**kw)
        self.sources = sources  # ("module:attr" of a click.Group, extra that installs it)
        self._loaded: dict[str, click.Group | None] = {}

    def _source(self, target: str, extra: str) -> click.Group | None:
        if target not in self._loaded:
            module, attr = target.split(":")
            try:
                group = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                click.echo(
                    f"note: the {module.split('.')[0]} commands are unavailable ({exc}): "
                    f"pip install 'edgefleet[{extra}]'",
                    err=True,
                )
                group = None
            self._loaded[target] = group
        return self._loaded[target]

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        for target, extra in self.sources:
            group = self._source(target, extra)
            if group is not None:
                names.update(group.list_commands(ctx))
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        own = super().get_command(ctx, cmd_name)
        if own is not None:
            return own
        for target, extra in self.sources:
            group = self._source(target, extra)
            cmd = group.get_command(ctx, cmd_name) if group is not None else None
            if cmd is not None:
                return cmd
        return None


EDGEFLEET_HELP = """edgefleet: compress a trained model for each kind of edge device, measure it against
the fp32 original, pack the candidate that meets the device's budgets into a signed artifact,
and ship it to a fleet.

\b
Typical first steps:
  edgefleet profiles                      # the device kinds and their budgets
  edgefleet keys generate --out keys/     # a signing key pair
  edgefleet build edgefleet.toml --all-profiles --key keys/edgefleet.key
  edgefleet inspect out/NAME-VERSION-PROFILE.efa --key keys/edgefleet.pub

\b
Then to the devices, and watching them:
  edgefleet demo                          # the whole loop on this machine, in under a minute
  edgefleet publish X.efa --broker URL; edgefleet deploy NAME@VERSION --group G --canary 1 --broker URL
  edgefleet collect --broker URL --db fleet.db; edgefleet fleet watch --db fleet.db
"""

edgefleet = GatheredGroup(
    [("builder.cli:cli", "builder"), ("fleet.commands:cli", "fleet")],
    name="edgefleet",
    help=EDGEFLEET_HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
edgefleet = click.version_option(__version__, prog_name="edgefleet")(edgefleet)


def main(argv: list[str] | None = None) -> int:
    """`edgefleet`: the workstation command (builder and fleet commands)."""
    return run_cli(edgefleet, argv, "edgefleet")


if __name__ == "__main__":
    sys.exit(main())
