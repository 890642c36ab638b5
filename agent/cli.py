"""edgefleet-agent: the device daemon's command line (torch-free)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from agent import __version__
from agent.errors import EdgefleetError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet-agent")
def cli() -> None:
    """edgefleet device agent: pulls signed model artifacts, tests them on this device,
    swaps them in atomically (or rolls back) and serves local inference.

    Run `edgefleet-agent COMMAND --help` for the options of each command.
    """


@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Trusted ed25519 public key (PEM); repeat for several.")
@click.option("--json", "as_json", is_flag=True, help="Print the verified manifest as JSON.")
def verify_cmd(artifact: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify ARTIFACT's signature and file hashes against trusted keys."""
    from agent.protocol.artifact import verify_artifact
    from agent.protocol.signing import load_public_key

    va = verify_artifact(artifact, [load_public_key(k) for k in keys])
    m = va.manifest
    if as_json:
        click.echo(json.dumps({"ok": True, "sha256": va.sha256, "key_id": va.key_id, "manifest": m.to_dict()}))
    else:
        click.echo(f"OK {artifact.name}: {m.name} {m.version} for {m.profile} ({m.runtime}, {m.precision}), "
                   f"signed by {va.key_id}, sha256 {va.sha256[:16]}")


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="edgefleet-agent", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except EdgefleetError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
