"""Operator commands on devices/{id}/cmd: deploy, rollback, benchmark, rebirth, status.

Every command is answered on cmd/result with its id; an unknown op or a bad argument gets
``ok: false`` and a reason, never an exception out of the agent.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from agent.deploy import selftest
from agent.protocol.messages import COMMAND_OPS, Command, CommandResult, Deployment

if TYPE_CHECKING:
    from agent.deploy.agent import Agent

# The benchmark runs on the deployment worker: bounded in count and in time.
MAX_BENCH_RUNS = 1000
MAX_BENCH_S = 10.0


def command_id(payload: bytes) -> str | None:
    """The ``id`` of a command that does not validate, when it can be read (to answer it)."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    cid = doc.get("id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) and 1 <= len(cid) <= 128 else None


def _args_problem(cmd: Command) -> str | None:
    """Arguments that the op does not take (a typo is refused rather than ignored)."""
    takes = {"deploy": {"name", "version", "sha256"}, "rollback": {"version"}, "benchmark": {"runs"}}
    given = {k for k in ("name", "version", "sha256", "runs") if getattr(cmd, k) is not None}
    extra = given - takes.get(cmd.op, set())
    return f"{cmd.op} does not take {', '.join(sorted(extra))}" if extra else None


def _benchmark(agent: Agent, cmd: Command) -> tuple[bool, str, dict[str, Any]]:
    if agent.session is None or agent.golden is None:
        return False, "no active model", {}
    runs = cmd.runs if cmd.runs is not None else agent.cfg.install.bench_runs
    if not 1 <= runs <= MAX_BENCH_RUNS:
        return False, f"runs must be between 1 and {MAX_BENCH_RUNS}", {}
    before = agent.thermal.read()
    lat = selftest.benchmark(agent.session, agent.golden, runs, agent.latency.record, MAX_BENCH_S)
    after = agent.thermal.read()
    temps = [t for t in (before.max_temp_c, after.max_temp_c) if t is not None]
    throttled = [t for t in (before.throttled, after.throttled) if t is not None]
    thermal: dict[str, Any] = {}
    if temps:
        thermal["max_temp_c"] = max(temps)
    if throttled:
        thermal["throttled"] = any(throttled)
    if after.detail:
        thermal["detail"] = after.detail
    a = agent.active
    return True, "", {
        "runs": lat.runs, "requested_runs": runs, "p50_ms": round(lat.p50_ms, 4),
        "p95_ms": round(lat.p95_ms, 4), "p99_ms": round(lat.p99_ms, 4), "max_ms": round(lat.max_ms, 4),
        "model": a.label if a else None, "thermal": thermal,
    }


def handle_command(agent: Agent, cmd: Command) -> CommandResult:
    ok, reason, detail = True, "", dict[str, Any]()
    problem = None if cmd.op not in COMMAND_OPS else _args_problem(cmd)
    if cmd.op not in COMMAND_OPS:
        ok, reason = False, f"unknown op '{cmd.op[:64]}' (one of {', '.join(COMMAND_OPS)})"
    elif problem is not None:
        ok, reason = False, problem
    elif cmd.op == "rollback":
        ok, reason = agent.rollback_command(cmd.id, cmd.version)
        if ok:
            a = agent.active
            detail = {"active": a.label if a else None}
    elif cmd.op == "rebirth":
        agent.publish_state()
    elif cmd.op == "status":
        detail = agent.status()
    elif cmd.op == "benchmark":
        ok, reason, detail = _benchmark(agent, cmd)
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
