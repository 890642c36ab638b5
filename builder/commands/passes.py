"""`edgefleet passes`: the registered passes and the options a recipe step may give each."""

from __future__ import annotations

import json
from typing import Any

import click

from agent.errors import EdgefleetError, UsageError


@click.command("passes")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the passes and their options as JSON.")
def passes_cmd(name: str | None, as_json: bool) -> None:
    """List the registered passes and what each accepts; with NAME, that pass's options
    (the `config = { ... }` keys a recipe step may set), their types and defaults."""
    from builder.passes import REGISTRY, get_pass

    if name is not None and name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(REGISTRY)})")
    docs: list[dict[str, Any]] = []
    for n in [name] if name else list(REGISTRY):
        try:
            p = get_pass(n)
        except EdgefleetError as exc:
            docs.append({"name": n, "error": str(exc)})
            continue
        options = []
        for key, f in p.config_class.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            ann = f.annotation
            text = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            options.append(
                {"name": key, "type": text, "required": f.is_required(), "default": default}
            )
        docs.append(
            {
                "name": n,
                "accepts": [k.value for k in p.accepts],
                "description": p.description,
                "options": options,
            }
        )
    if as_json:
        click.echo(json.dumps(docs, indent=2, default=str))
        return
    for d in docs:
        if "error" in d:
            click.echo(f"{d['name']:14} unavailable: {d['error']}")
            continue
        acc = "/".join(d["accepts"]) or "(source)"
        click.echo(f"{d['name']:14} {acc:12} {d['description']}")
        if name:
            for o in d["options"]:
                dflt = "required" if o["required"] else f"default {o['default']!r}"
                click.echo(f"    {o['name']:28} {o['type']:40} {dflt}")
    if not name:
        click.echo("\n`edgefleet passes NAME` shows a pass's options.")
