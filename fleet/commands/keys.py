"""`edgefleet keys`: the keys and the root-signed trust document (docs/security.md).

The work is in fleet/trust.py; this is the click layer. Every command that changes the trust
document writes its next version to --trust and, given --broker, publishes it retained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from agent.errors import UsageError
from fleet.commands.options import broker_from_options, broker_options_with

TRUST_HELP = "The trust document (JSON) to change."
ROOT_HELP = "The root private key (PEM) that signs the trust document; keep it offline."

trust_opt = click.option(
    "--trust",
    "trust",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("keys/trust.json"),
    show_default=True,
    help=TRUST_HELP,
)
root_opt = click.option(
    "--root-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("keys/root.key"),
    show_default=True,
    help=ROOT_HELP,
)
json_opt = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
publish_opts = broker_options_with(
    "Also publish the new document (retained) on this broker: mqtt[s]://HOST:PORT.",
    required=False,
)


@click.group("keys")
def keys_grp() -> None:
    """Keys and the trust document: who may release artifacts and who may deploy.

    \b
    A root key (offline) signs the trust document, which lists the release keys (they sign
    artifacts) and the operator keys (they sign deployments and commands). Devices pin only
    root.pub and take every newer trust document signed by the root. Start with:
      edgefleet keys init-root --out keys/      # root, release and operator keys, trust.json
      edgefleet keys publish --trust keys/trust.json --broker mqtt://HOST:1883
    then build with --key keys/release.key and deploy with --operator-key keys/operator.key.
    """


def _summary(doc: Any) -> dict[str, Any]:
    s = doc.signed
    return {
        "version": s.version,
        "expires": s.expires,
        "root_keys": list(s.root_keys),
        "keys": {
            k: {"role": e.role, "name": e.name, "expires": e.expires} for k, e in s.keys.items()
        },
        "revoked": list(s.revoked),
    }


def _done(
    doc: Any, what: str, trust: Path, kw: dict[str, Any], as_json: bool, **extra: Any
) -> None:
    published = None
    if kw.get("broker"):
        from fleet.trust import publish

        broker = broker_from_options(kw)
        publish(broker, trust)
        published = broker.url
    if as_json:
        click.echo(
            json.dumps({**_summary(doc), **extra, "file": str(trust), "published": published})
        )
        return
    click.echo(
        f"{what}: {trust} is now trust document v{doc.signed.version} (expires {doc.signed.expires})"
    )
    click.echo(
        f"published on {published}: devices take it now"
        if published
        else "publish it: edgefleet keys publish --trust " + str(trust) + " --broker URL"
    )


@keys_grp.command("generate")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="Directory to write NAME.key (private, mode 0600) and NAME.pub into.",
)
@click.option("--name", default="edgefleet", show_default=True, help="Base name of the key files.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keys_generate(out_dir: Path, name: str, force: bool) -> None:
    """Create one ed25519 key pair (add it to the trust document with `keys add`)."""
    from agent.protocol.signing import generate_keypair, key_id, load_public_key

    try:
        priv, pub = generate_keypair(out_dir, name, force)
    except PermissionError as exc:
        raise UsageError(f"{out_dir}: cannot write keys ({exc.strerror})") from None
    click.echo(
        f"private key: {priv}\npublic key:  {pub}\nkey id:      {key_id(load_public_key(pub))}"
    )


@keys_grp.command("init-root")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("keys"),
    show_default=True,
    help="Directory for root.key/.pub, release.key/.pub, operator.key/.pub and trust.json.",
)
@click.option(
    "--no-role-keys",
    is_flag=True,
    help="Only the root key and an empty trust document (add keys with `keys add`).",
)
@click.option("--force", is_flag=True, help="Replace existing keys and trust document.")
@publish_opts
@json_opt
def keys_init_root(
    out_dir: Path, no_role_keys: bool, force: bool, as_json: bool, **kw: Any
) -> None:
    """Start a root of trust: a root key, a release key, an operator key and trust document v1.

    Give every device root.pub (config `root_key`) and trust.json (config `trust_file`); move
    root.key offline once the document is published.
    """
    from fleet.trust import init_root, load_document

    setup = init_root(out_dir, force, role_keys=not no_role_keys)
    doc = load_document(setup.trust)
    if not as_json:
        click.echo(
            f"root key:     {setup.root_key} (keep it offline)\nroot public:  {setup.root_pub} (pin it on every device)"
        )
        if setup.release_key:
            click.echo(f"release key:  {setup.release_key} (edgefleet build --key)")
        if setup.operator_key:
            click.echo(f"operator key: {setup.operator_key} (edgefleet deploy --operator-key)")
    _done(doc, "created", setup.trust, kw, as_json)


@keys_grp.command("add")
@click.argument("public_key", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--role",
    type=click.Choice(["release", "operator"]),
    required=True,
    help="What the key may sign.",
)
@click.option(
    "--days", type=float, default=730.0, show_default=True, help="Days until the key expires."
)
@click.option("--name", default="", help="A name for the key (default: the file's name).")
@trust_opt
@root_opt
@publish_opts
@json_opt
def keys_add(
    public_key: Path,
    role: str,
    days: float,
    name: str,
    trust: Path,
    root_key: Path,
    as_json: bool,
    **kw: Any,
) -> None:
    """Add PUBLIC_KEY (PEM) as a release or operator key."""
    from fleet.trust import add_key

    if days <= 0:
        raise UsageError("--days must be positive")
    _done(
        add_key(trust, root_key, public_key, role, days, name),
        f"added {role} key {public_key}",
        trust,
        kw,
        as_json,
    )


@keys_grp.command("revoke")
@click.argument("key", metavar="KEY")
@trust_opt
@root_opt
@publish_opts
@json_opt
def keys_revoke(key: str, trust: Path, root_key: Path, as_json: bool, **kw: Any) -> None:
    """Revoke a compromised KEY (key id, its prefix, its name or its .pub file).

    Devices that take the new document refuse everything the key signs, and stop serving
    artifacts signed by it: they fall back to a kept version that is still trusted, or stop
    serving (a ROLLED_BACK event says why). For a routine change use `keys rotate`.
    """
    from fleet.trust import revoke

    doc, kid = revoke(trust, root_key, key)
    _done(doc, f"revoked {kid}", trust, kw, as_json, revoked_key=kid)


@keys_grp.command("rotate")
@click.option(
    "--role",
    type=click.Choice(["release", "operator", "root"]),
    required=True,
    help="Whose key to replace.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("keys"),
    show_default=True,
    help="Where the new key pair goes.",
)
@click.option(
    "--name", default=None, help="Base name of the new key files (default ROLE-YYYYMMDD)."
)
@trust_opt
@root_opt
@publish_opts
@json_opt
def keys_rotate(
    role: str,
    out_dir: Path,
    name: str | None,
    trust: Path,
    root_key: Path,
    as_json: bool,
    **kw: Any,
) -> None:
    """Replace the ROLE's key with a new one (not compromised: see `keys revoke`).

    release/operator: the new key is added and the old ones expire now (they sign nothing new;
    models they signed keep serving). root: the new document is signed by the old and the new
    root key; devices trust only the new root from then on.
    """
    import time

    from fleet.trust import rotate, rotate_root

    base = name or f"{role}-{time.strftime('%Y%m%d')}"
    if role == "root":
        doc, priv, pub = rotate_root(trust, root_key, out_dir, base)
        if not as_json:
            click.echo(
                f"new root key: {priv} (keep it offline; the old one may be destroyed)\nnew root public: {pub}"
            )
        _done(doc, "rotated the root key", trust, kw, as_json, new_key=str(priv))
        return
    doc, priv, old = rotate(trust, root_key, role, out_dir, base)
    if not as_json:
        click.echo(f"new {role} key: {priv}; retired: {', '.join(old) or 'none'}")
    _done(doc, f"rotated the {role} key", trust, kw, as_json, new_key=str(priv), retired=old)


@keys_grp.command("renew")
@click.option(
    "--days",
    type=float,
    default=365.0,
    show_default=True,
    help="Days until the new version expires.",
)
@trust_opt
@root_opt
@publish_opts
@json_opt
def keys_renew(days: float, trust: Path, root_key: Path, as_json: bool, **kw: Any) -> None:
    """Sign the same keys again under a new version and expiry (a trust document expires)."""
    from fleet.trust import renew

    if days <= 0:
        raise UsageError("--days must be positive")
    _done(renew(trust, root_key, days), "renewed", trust, kw, as_json)


@keys_grp.command("publish")
@trust_opt
@broker_options_with()
@json_opt
def keys_publish(trust: Path, as_json: bool, **kw: Any) -> None:
    """Publish the trust document (retained) on the broker; devices take it if it is newer."""
    from fleet.trust import load_document

    _done(load_document(trust), "published", trust, kw, as_json)


@keys_grp.command("show")
@trust_opt
@json_opt
def keys_show(trust: Path, as_json: bool) -> None:
    """What the trust document says: version, expiry, keys and their roles, revoked keys."""
    from fleet.trust import load_document

    s = _summary(load_document(trust))
    if as_json:
        click.echo(json.dumps(s))
        return
    click.echo(f"trust document v{s['version']}, expires {s['expires']}")
    click.echo(f"root keys: {', '.join(s['root_keys'])}")
    for kid, e in s["keys"].items():
        click.echo(f"  {kid}  {e['role']:8}  {e['name'] or '-':20}  expires {e['expires']}")
    if s["revoked"]:
        click.echo(f"revoked: {', '.join(s['revoked'])}")
