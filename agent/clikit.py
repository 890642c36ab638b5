"""The one entry-point wrapper both CLIs share: user errors are one line, bugs keep tracebacks."""

from __future__ import annotations

import click

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
