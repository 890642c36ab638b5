"""Operator commands on devices/{id}/cmd: rollback, deploy, benchmark, rebirth, status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.deploy import selftest
from agent.protocol.messages import Command, CommandResult, Deployment

if TYPE_CHECKING:
    from agent.deploy.agent import Agent


def handle_command(agent: Agent, cmd: Command) -> CommandResult:
    ok, reason, detail = True, "", dict[str, Any]()
    if cmd.op == "rollback":
        ok = agent.rollback_command(cmd.id)
        reason = "" if ok else "no previous version to roll back to"
    elif cmd.op == "rebirth":
        agent.publish_state()
    elif cmd.op == "status":
        detail = agent.status()
    elif cmd.op == "benchmark":
        if agent.session is None or agent.golden is None:
            ok, reason = False, "no active model"
        else:
            lat = selftest.benchmark(agent.session, agent.golden, agent.cfg.install.bench_runs)
            detail = {"p50_ms": lat.p50_ms, "p95_ms": lat.p95_ms, "runs": lat.runs}
    elif cmd.op == "deploy":
        if not (cmd.name and cmd.version and cmd.sha256):
            ok, reason = False, "deploy needs name, version and sha256"
        else:
            try:
                dep = Deployment(name=cmd.name, version=cmd.version, sha256=cmd.sha256,
                                 deployed_at=f"cmd:{cmd.id}")
            except ValueError as exc:
                ok, reason = False, f"invalid deploy command: {str(exc).splitlines()[-1].strip()}"
            else:
                agent.deploy_command(dep)
    return CommandResult(id=cmd.id, ok=ok, reason=reason, detail=detail)
