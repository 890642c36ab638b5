"""edgefleet-agent: the device daemon's command line (torch-free)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from agent import __version__
from agent.clikit import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet-agent")
def cli() -> None:
    """edgefleet device agent: pulls signed model artifacts, tests them on this device,
    swaps them in atomically (or rolls back) and serves local inference.

    Run `edgefleet-agent COMMAND --help` for the options of each command.
    """


@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Trusted ed25519 public key (PEM); repeat for several.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verified manifest as JSON.")
def verify_cmd(artifact: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify ARTIFACT's signature and file hashes against trusted keys."""
    from agent.protocol.artifact import verify_artifact
    from agent.protocol.signing import load_public_key

    va = verify_artifact(artifact, [load_public_key(k) for k in keys])
    m = va.manifest
    if as_json:
        click.echo(
            json.dumps(
                {"ok": True, "sha256": va.sha256, "key_id": va.key_id, "manifest": m.to_dict()}
            )
        )
    else:
        click.echo(
            f"OK {artifact.name}: {m.name} {m.version} for {m.profile} ({m.runtime}, {m.precision}), "
            f"signed by {va.key_id}, sha256 {va.sha256[:16]}"
        )


def _load(config: Path) -> tuple[object, object]:
    from agent.config import load_config
    from agent.deploy.policy import resolve_policy

    cfg = load_config(config)
    return cfg, resolve_policy(cfg, str(config))


@cli.command("check-config")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def check_config_cmd(config: Path, as_json: bool) -> None:
    """Validate CONFIG (TOML) without connecting anywhere; errors name the file and the key.

    Also says which inference runtimes are installed here and which the profile needs, and
    whether this machine's architecture is the profile's (hardware.arch). A needed runtime that
    is missing is an error (exit 7) naming the extra to install.
    """
    from agent.config import AgentConfig
    from agent.deploy.policy import Policy
    from agent.errors import missing_dependency

    cfg, policy = _load(config)
    assert isinstance(cfg, AgentConfig) and isinstance(policy, Policy)
    policy.trust.verify_now()  # the provisioned trust document's signature, against root_key
    if policy.trust.doc is None:
        policy = dataclasses.replace(
            policy,
            warnings=(
                *policy.warnings,
                "no trust document (trust_file unset, none held in state_dir): the agent "
                "installs nothing until one signed by root_key arrives on edgefleet/v1/trust",
            ),
        )
    found = policy.device.runtimes
    missing = [r for r in policy.runtimes if r not in found]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": not missing,
                    "config": str(config),
                    "device_id": cfg.device_id,
                    "profile": cfg.profile,
                    "broker": cfg.broker.url,
                    "keys": len(policy.keys),
                    "trust_version": policy.trust.version,
                    "runtimes_accepted": list(policy.runtimes),
                    "runtimes_found": found,
                    "profile_runtime": policy.profile_runtime,
                    "max_p95_ms": policy.max_p95_ms,
                    "device": policy.device.to_dict(),
                    "warnings": list(policy.warnings),
                }
            )
        )
    else:
        click.echo(f"device: {policy.device.line()}")
        click.echo(
            f"runtimes found: {', '.join(found.values()) or 'none'}; profile {cfg.profile} needs "
            f"{policy.profile_runtime or '(no profile file)'}; this agent accepts "
            f"{', '.join(policy.runtimes) or 'none'}"
        )
        for w in policy.warnings:
            hint = ' (arch_check = "refuse" makes this an error)' if "arch" in w else ""
            click.echo(f"WARNING: {w}{hint}")
    if missing:
        package = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}.get(
            missing[0], missing[0]
        )
        jetson = "NVIDIA's onnxruntime-gpu on a Jetson" if missing[0] == "onnxruntime" else ""
        raise missing_dependency(
            package,
            f"agent,{missing[0]}",
            f"{config}: runtime {', '.join(missing)} is not installed here; it",
            alternative=jetson,
        )
    if not as_json:
        click.echo(
            f"OK {config}: device {cfg.device_id}, profile {cfg.profile}, broker {cfg.broker.url}, "
            f"trust document v{policy.trust.version} ({len(policy.keys)} release key(s)), runtimes {', '.join(policy.runtimes) or 'none'}, "
            f"max p95 {policy.max_p95_ms:g} ms"
        )


@cli.command("run")
@click.option(
    "--config",
    "config",
    required=True,
    type=click.Path(path_type=Path),
    help="Agent config (TOML); check it first with `edgefleet-agent check-config`.",
)
def run_cmd(config: Path) -> None:
    """Run the agent: connect to the broker, follow the desired deployment, keep the model healthy,
    and serve the active model on the local inference endpoint ([serve] in the config).

    Under systemd (Type=notify) it reports READY once the active model is loaded, pings the
    watchdog and keeps STATUS current. Stops cleanly on SIGTERM or Ctrl-C (the state message
    then says offline).
    """
    import logging
    import signal
    import threading

    from agent.config import AgentConfig
    from agent.deploy.agent import Agent
    from agent.deploy.policy import Policy
    from agent.service import Notifier
    from agent.transport.mqtt import MqttTransport

    cfg, policy = _load(config)
    assert isinstance(cfg, AgentConfig) and isinstance(policy, Policy)
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("agent").info("device: %s", policy.device.line())
    for w in policy.warnings:
        logging.getLogger("agent").warning('%s (arch_check = "refuse" makes this an error)', w)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(cfg, policy, MqttTransport(cfg.broker, cfg.client_id))
    agent.notifier = Notifier.from_environ()
    endpoint = None
    if cfg.serve.enabled:
        from agent.serve.http import Endpoint

        endpoint = Endpoint(cfg.serve, agent.holder, agent.latency, agent.capture, agent.generation)
        endpoint.start()  # a port in use is a one-line error before anything else starts
    try:
        agent.run(stop)
    finally:
        if endpoint is not None:
            endpoint.stop()


@cli.command("install-service")
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Install under this root (a staging or image directory); files go to ROOT/etc/...",
)
@click.option(
    "--user",
    default=None,
    help="Run as this existing user (User=/Group=) instead of a transient DynamicUser.",
)
@click.option(
    "--exec",
    "executable",
    default=None,
    help="Path of the edgefleet-agent executable for ExecStart (default: this one).",
)
@click.option("--force", is_flag=True, help="Replace an existing config with the skeleton.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def install_service_cmd(
    root: Path, user: str | None, executable: str | None, force: bool, as_json: bool
) -> None:
    """Write the systemd unit (ROOT/etc/systemd/system/edgefleet-agent.service) and a config
    skeleton (ROOT/etc/edgefleet/agent.toml; an existing one is kept unless --force).

    Then: edit the config, `edgefleet-agent check-config /etc/edgefleet/agent.toml`,
    `systemctl daemon-reload && systemctl enable --now edgefleet-agent`.
    """
    from agent.service import install_service

    res = install_service(root, user, executable, force)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"wrote {res['unit']}")
    click.echo(
        f"wrote {res['config']}"
        if res["config_written"]
        else f"kept {res['config']} (exists; --force replaces it with the skeleton)"
    )
    click.echo(
        "next: edit the config, then `systemctl daemon-reload && systemctl enable --now edgefleet-agent`"
    )


@cli.command("status")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    default=None,
    help="Agent config; its state_dir is read.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="State directory to read (instead of --config).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status_cmd(config: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Show the active model, installed versions, downloads and rejections (reads the state dir)."""
    from agent.config import load_config
    from agent.errors import UsageError
    from agent.store.summary import state_summary

    if state_dir is None:
        if config is None:
            raise UsageError("give --config PATH or --state-dir DIR")
        state_dir = load_config(config).state_dir
    if not state_dir.is_dir():
        raise UsageError(f"{state_dir}: state directory not found (has the agent run yet?)")
    from agent.device import facts

    s = state_summary(state_dir)
    device = facts()
    s["device"] = device.to_dict()
    if as_json:
        click.echo(json.dumps(s))
        return
    click.echo(f"device: {device.line()}")
    a = s["active"]
    click.echo(f"active: {a['name']} {a['version']} ({a['sha256'][:16]})" if a else "active: none")
    click.echo(f"installed: {', '.join(s['history']) or 'none'}")
    if s["install"]:
        click.echo(f"install in progress: {s['install']}")
    for d in s["downloads"]:
        click.echo(
            f"download {d['sha256'][:16]}: {'complete' if d['complete'] else str(d['chunks_done']) + ' chunks'}"
        )
    for sha, r in s["rejected"].items():
        click.echo(f"rejected {sha[:16]}: {r.get('reason', '')}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv, "edgefleet-agent")


if __name__ == "__main__":
    sys.exit(main())
