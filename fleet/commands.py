"""`edgefleet publish` and `edgefleet deploy` (registered in the edgefleet CLI)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def broker_options_with(broker_help: str = "Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT.",
                        required: bool = True) -> Callable[[F], F]:
    """--broker plus its TLS and login options, shared by every command that talks to a broker."""
    def deco(f: F) -> F:
        opts = [
            click.option("--broker", required=required, default=None, help=broker_help),
            click.option("--ca-file", default=None, help="CA certificate (PEM) for mqtts://."),
            click.option("--cert-file", default=None, help="Client certificate (PEM) for mqtts://."),
            click.option("--key-file", default=None, help="Client key (PEM) for mqtts://."),
            click.option("--username", default=None, help="Broker user name."),
            click.option("--password", default=None, envvar="EDGEFLEET_BROKER_PASSWORD",
                         help="Broker password (or $EDGEFLEET_BROKER_PASSWORD)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


broker_options = broker_options_with()


def _broker(kw: dict[str, Any]) -> Any:
    from fleet.mqtt import broker_config

    return broker_config(kw.pop("broker"), kw.pop("ca_file"), kw.pop("cert_file"), kw.pop("key_file"),
                         kw.pop("username"), kw.pop("password"))


@click.command("publish")
@click.argument("artifact", type=click.Path(path_type=Path))
@broker_options
@click.option("--chunk-size", default=1 << 20, show_default=True, type=int, help="Bytes per chunk message.")
@click.option("--force", is_flag=True, help="Publish again even if the broker already holds this artifact.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish_cmd(artifact: Path, chunk_size: int, force: bool, as_json: bool, **kw: Any) -> None:
    """Publish ARTIFACT (.efa) to the broker as retained chunks plus a manifest, so devices can
    fetch it. Safe to repeat: an artifact already on the broker is left as it is.
    """
    from agent.errors import UsageError
    from fleet.publish import chunk_count, publish_artifact

    broker = _broker(kw)
    if not artifact.is_file():
        raise UsageError(f"{artifact}: no such artifact file")
    total = chunk_count(artifact, chunk_size)
    # sys.stderr, not click.get_text_stream: deprecated in click 8.5 (and untyped there)
    with click.progressbar(length=total, label=f"publishing {artifact.name}", file=sys.stderr) as bar:
        res = publish_artifact(artifact, broker, chunk_size, force, progress=bar.update)
    if as_json:
        click.echo(json.dumps(res.__dict__))
    elif res.skipped:
        click.echo(f"already published: {res.name} {res.version} for {res.profile} (sha256 {res.sha256[:16]})")
    else:
        click.echo(f"published {res.name} {res.version} for {res.profile}: {res.chunks} chunks, "
                   f"{res.size / 1e6:.1f} MB in {res.seconds:.1f}s (sha256 {res.sha256[:16]})")


@click.command("deploy")
@click.argument("spec", metavar="NAME@VERSION")
@click.option("--device", default=None, help="Deploy to one device (wins over its groups).")
@click.option("--group", default=None, help="Deploy to every device in a group.")
@click.option("--profile", default=None, help="Which profile's artifact, when several are published.")
@click.option("--canary", default=None, metavar="N|N%",
              help="Staged rollout (with --group): deploy to N (or N%) online devices first and go on "
                   "to the whole group only when they are healthy; otherwise roll them back and stop.")
@click.option("--wait", is_flag=True, help="With --group: also wait for the rest of the group (offline "
              "devices are reported as pending; they catch up when they connect).")
@click.option("--max-p95-regression-pct", default=20.0, show_default=True, type=float,
              help="A canary whose on-device p95 is this much worse than the model it replaced fails.")
@click.option("--p95-slack-ms", default=0.5, show_default=True, type=float,
              help="Absolute slack added to the p95 check (sub-millisecond models jitter).")
@click.option("--observe", default=None, type=float, metavar="S",
              help="Accept a canary ACTIVE for S seconds without errors (default: wait for HEALTHY, "
                   "the end of the agent's probation).")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait for the canaries (and, with --wait, for the rest).")
@broker_options
@click.option("--json", "as_json", is_flag=True, help="Print the deployment (or rollout summary) as JSON.")
def deploy_cmd(spec: str, device: str | None, group: str | None, profile: str | None, canary: str | None,
               wait: bool, max_p95_regression_pct: float, p95_slack_ms: float, observe: float | None,
               timeout: float, as_json: bool, **kw: Any) -> None:
    """Set the desired model of a device (--device ID) or a group (--group G). Devices pick it up
    now or when they next connect; follow progress on edgefleet/v1/devices/ID/events.

    \b
    Staged rollout to a group, halting (and rolling the canaries back) on a bad canary:
      edgefleet deploy digits@1.1.0 --group lab --canary 1 --wait --broker mqtt://HOST:1883
    """
    from fleet.deploy import deploy

    if canary is not None or wait:
        from agent.errors import RolloutHalted, UsageError
        from fleet.deploy import RolloutDisplay, staged_rollout
        from fleet.rollout import Gate

        if group is None or device is not None:
            raise UsageError("--canary and --wait need --group G (and no --device)")
        gate = Gate(max_p95_regression_pct, p95_slack_ms, observe)
        with RolloutDisplay(f"deploy --group {group}") as show:
            ro = staged_rollout(_broker(kw), spec, group, canary, profile, gate, wait, timeout, show)
        if as_json:
            click.echo(ro.json())
        else:
            pending = ro.summary()["pending"]
            click.echo(f"rollout of {ro.name} {ro.version} to group {group}: {ro.phase}"
                       + (f" (canaries: {', '.join(ro.canaries)})" if ro.canaries else "")
                       + (f"; pending (offline): {', '.join(pending)}" if pending else ""))
        if ro.phase != "done":
            raise RolloutHalted(f"rollout {ro.phase}: {ro.reason}")
        return
    res = deploy(_broker(kw), spec, device=device, group=group, profile=profile)
    if as_json:
        click.echo(json.dumps({"topic": res.topic, "deployment": res.deployment.model_dump()}))
    else:
        d = res.deployment
        click.echo(f"deployed {d.name} {d.version} ({d.profile}, sha256 {d.sha256[:16]}) on {res.topic}")
