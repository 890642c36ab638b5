"""`edgefleet publish`: an artifact onto the broker as retained chunks plus a manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from fleet.commands.options import broker_from_options, broker_options


@click.command("publish")
@click.argument("artifact", type=click.Path(path_type=Path))
@broker_options
@click.option(
    "--chunk-size", default=1 << 20, show_default=True, type=int, help="Bytes per chunk message."
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Release public key(s): verify the artifact (signature, file hashes, canonical tar) "
    "before publishing; needed to replace an artifact already published under the "
    "same name, version and profile.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Publish again even if the broker already holds this artifact, "
    "and replace a published one without --key (devices still verify it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish_cmd(
    artifact: Path, chunk_size: int, keys: tuple[Path, ...], force: bool, as_json: bool, **kw: Any
) -> None:
    """Publish ARTIFACT (.efa) to the broker as retained chunks plus a manifest, so devices can
    fetch it. Safe to repeat: an artifact already on the broker is left as it is.
    """
    from agent.errors import UsageError
    from agent.protocol.signing import load_public_key
    from fleet.publish import chunk_count, publish_artifact

    broker = broker_from_options(kw)
    if not artifact.is_file():
        raise UsageError(f"{artifact}: no such artifact file")
    trusted = [load_public_key(k) for k in keys]
    total = chunk_count(artifact, chunk_size)
    # sys.stderr, not click.get_text_stream: deprecated in click 8.5 (and untyped there)
    with click.progressbar(
        length=total, label=f"publishing {artifact.name}", file=sys.stderr
    ) as bar:
        res = publish_artifact(
            artifact, broker, chunk_size, force, progress=bar.update, trusted=trusted
        )
    if as_json:
        click.echo(json.dumps(res.__dict__))
    elif res.skipped:
        click.echo(
            f"already published: {res.name} {res.version} for {res.profile} (sha256 {res.sha256[:16]})"
        )
    else:
        click.echo(
            f"published {res.name} {res.version} for {res.profile}: {res.chunks} chunks, "
            f"{res.size / 1e6:.1f} MB in {res.seconds:.1f}s (sha256 {res.sha256[:16]})"
        )
