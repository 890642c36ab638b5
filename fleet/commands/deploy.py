"""`edgefleet deploy`: the desired model of a device or a group, at once or as a staged rollout."""

from __future__ import annotations

import json
from typing import Any

import click

from fleet.commands.options import broker_from_options, broker_options, operator_option


@click.command("deploy")
@click.argument("spec", metavar="NAME@VERSION")
@click.option("--device", default=None, help="Deploy to one device (wins over its groups).")
@click.option("--group", default=None, help="Deploy to every device in a group.")
@click.option(
    "--profile", default=None, help="Which profile's artifact, when several are published."
)
@click.option(
    "--canary",
    default=None,
    metavar="N|N%",
    help="Staged rollout (with --group): deploy to N (or N%) online devices first and go on "
    "to the whole group only when they are healthy; otherwise roll them back and stop.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="With --group: also wait for the rest of the group (offline "
    "devices are reported as pending; they catch up when they connect).",
)
@click.option(
    "--max-p95-regression-pct",
    default=20.0,
    show_default=True,
    type=float,
    help="A canary whose on-device p95 is this much worse than the model it replaced fails.",
)
@click.option(
    "--p95-slack-ms",
    default=0.5,
    show_default=True,
    type=float,
    help="Absolute slack added to the p95 check (sub-millisecond models jitter).",
)
@click.option(
    "--max-tok-s-drop-pct",
    default=20.0,
    show_default=True,
    type=float,
    help="Text-generation models: a canary whose decode tokens/s (telemetry) is this much "
    "lower than the model it replaced fails.",
)
@click.option(
    "--max-ttft-regression-pct",
    default=20.0,
    show_default=True,
    type=float,
    help="Text-generation models: a canary whose time-to-first-token p95 is this much worse "
    "(+ 5 ms) than the model it replaced fails.",
)
@click.option(
    "--observe",
    default=None,
    type=float,
    metavar="S",
    help="Accept a canary ACTIVE for S seconds without errors (default: wait for HEALTHY, "
    "the end of the agent's probation).",
)
@click.option(
    "--max-output-drift",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    metavar="JS",
    help="With --canary: also halt when a canary's predicted-class distribution diverges from "
    "what the old model predicts on the rest of the group (Jensen-Shannon divergence in bits, "
    "0..1; e.g. 0.25). Needs devices that send monitor blocks with class counts.",
)
@click.option(
    "--capture",
    "capture",
    multiple=True,
    metavar="KEY=VALUE",
    help="Turn feedback capture on for this deployment's model with these [capture] keys "
    "(repeat the option: sample_rate=0.1, max_per_hour=500, triggers=label,drift, "
    "outputs_only=true; docs/monitoring.md), or 'off'. Deploying the version a device already "
    "runs changes only its capture. Without --capture, capture follows the device's config.",
)
@click.option(
    "--timeout",
    default=600.0,
    show_default=True,
    type=float,
    help="Seconds to wait for the canaries (and, with --wait, for the rest).",
)
@broker_options
@operator_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the deployment (or rollout summary) as JSON."
)
def deploy_cmd(
    spec: str,
    device: str | None,
    group: str | None,
    profile: str | None,
    canary: str | None,
    wait: bool,
    max_p95_regression_pct: float,
    p95_slack_ms: float,
    max_tok_s_drop_pct: float,
    max_ttft_regression_pct: float,
    observe: float | None,
    max_output_drift: float | None,
    capture: tuple[str, ...],
    timeout: float,
    operator_key: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Set the desired model of a device (--device ID) or a group (--group G). Devices pick it up
    now or when they next connect; follow progress on edgefleet/v1/devices/ID/events.

    \b
    Staged rollout to a group, halting (and rolling the canaries back) on a bad canary:
      edgefleet deploy digits@1.1.0 --group lab --canary 1 --wait --broker mqtt://HOST:1883

    The deployment is signed with the operator key (--operator-key or $EDGEFLEET_OPERATOR_KEY)
    and expires after 90 days: deploy again to renew it (docs/security.md).
    """
    from fleet.deploy import capture_keys, deploy
    from fleet.trust import operator

    signer = operator(operator_key)
    keys = capture_keys(capture) if capture else None

    if canary is not None or wait:
        from agent.errors import RolloutHalted, UsageError
        from fleet.rollout.display import RolloutDisplay
        from fleet.rollout.policy import Gate
        from fleet.rollout.runner import staged_rollout

        if group is None or device is not None:
            raise UsageError("--canary and --wait need --group G (and no --device)")
        if keys is not None:
            raise UsageError("--capture goes with a plain deploy (no --canary/--wait)")
        if max_output_drift is not None and canary is None:
            raise UsageError("--max-output-drift judges canaries: give --canary N too")
        gate = Gate(
            max_p95_regression_pct,
            p95_slack_ms,
            observe,
            max_output_drift,
            max_tok_s_drop_pct=max_tok_s_drop_pct,
            max_ttft_regression_pct=max_ttft_regression_pct,
        )
        with RolloutDisplay(f"deploy --group {group}") as show:
            ro = staged_rollout(
                broker_from_options(kw),
                spec,
                group,
                canary,
                signer,
                profile,
                gate,
                wait,
                timeout,
                show,
            )
        if as_json:
            click.echo(ro.json())
        else:
            pending = ro.summary()["pending"]
            click.echo(
                f"rollout of {ro.name} {ro.version} to group {group}: {ro.phase}"
                + (f" (canaries: {', '.join(ro.canaries)})" if ro.canaries else "")
                + (f"; pending (offline): {', '.join(pending)}" if pending else "")
            )
        if ro.phase != "done":
            raise RolloutHalted(f"rollout {ro.phase}: {ro.reason}")
        return
    res = deploy(
        broker_from_options(kw),
        spec,
        signer,
        device=device,
        group=group,
        profile=profile,
        capture=keys,
    )
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"topic": res.topic, "deployment": res.deployment.model_dump()}))
    else:
        d = res.deployment
        cap = "" if d.capture is None else f"; capture {json.dumps(d.capture, sort_keys=True)}"
        click.echo(
            f"deployed {d.name} {d.version} ({d.profile}, sha256 {d.sha256[:16]}) on {res.topic}"
            + cap
        )
