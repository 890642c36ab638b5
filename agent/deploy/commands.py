"""Operator commands on devices/{id}/cmd: deploy, rollback, benchmark, rebirth, status.

A command is the body of an envelope signed by an operator key, for this device, fresh, and
with a counter above the last one acted on (agent.deploy.trust); anything else is refused with
a reason in an event (and on cmd/result when the id can be read). Every command is answered on
cmd/result with its id; an unknown op or a bad argument gets ``ok: false`` and a reason, never
an exception out of the agent. They run on the agent's worker
thread and act through its parts (a rollback is the installer's, a deploy sets the desired state).

Commands cannot starve the worker ([commands]): at most ``max_pending`` wait (the agent answers
the rest "busy"), a benchmark is capped in runs and seconds, and benchmarks share a budget of
seconds per minute. A benchmark's inferences are not serving traffic: they are not recorded in
the latency recorder that telemetry and the rollout's canary gate read; the command's own result
carries their figures, and ``status`` counts them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.deploy import selftest
from agent.deploy.outbox import log
from agent.protocol import topics
from agent.protocol.golden import GoldenSet
from agent.protocol.messages import (
    COMMAND_OPS,
    MAX_CONTROL_BYTES,
    Command,
    CommandResult,
    Deployment,
    MessageError,
    encode,
    validate,
)
from agent.protocol.trust import Target, TrustError
from agent.telemetry.power import WindowPower, energy_fields

if TYPE_CHECKING:
    from agent.config import CommandsConfig
    from agent.deploy.agent import Agent

# A command refused as busy is answered with its id, read from at most this many bytes.
BUSY_ID_MAX_BYTES = 64 * 1024


class BenchBudget:
    """Benchmark seconds as a token bucket: ``bench_budget_s`` at most, refilled at that many per
    minute; a benchmark starts only when a whole ``bench_max_s`` is in it and pays what it used."""

    def __init__(self, cfg: CommandsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.need = cfg.bench_budget_s, cfg.bench_max_s
        self.rate = self.capacity / 60.0
        self._clock = clock
        self._tokens, self._t = self.capacity, clock()

    def left(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._t) * self.rate)
        self._t = now
        return self._tokens

    def wait_s(self) -> float:
        """Seconds until a benchmark may start (0: now); inf when benchmarks are off."""
        if self.capacity <= 0:
            return math.inf
        return max(0.0, (self.need - self.left()) / self.rate)

    def spend(self, seconds: float) -> None:
        self._tokens = self.left() - max(0.0, seconds)


@dataclass
class BenchStats:
    """What benchmark commands used since the agent started (``status`` shows them)."""

    commands: int = 0
    runs: int = 0
    seconds: float = 0.0
    refused: int = 0


def busy_result(cmd_id: str, pending: int) -> bytes:
    """The answer to a command that found the queue full."""
    return encode(CommandResult(id=cmd_id, ok=False, reason=f"busy: {pending} commands pending"))


def command_id(payload: bytes) -> str | None:
    """The ``id`` of a command that is refused, when it can be read (to answer it)."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("signed"), dict):
        body = doc["signed"].get("body")
        doc = body if isinstance(body, dict) else {}
    cid = doc.get("id") if isinstance(doc, dict) else None
    return cid if isinstance(cid, str) and 1 <= len(cid) <= 128 else None


def _args_problem(cmd: Command) -> str | None:
    """Arguments that the op does not take (a typo is refused rather than ignored)."""
    takes = {
        "deploy": {"name", "version", "sha256", "size", "chunks_sha256"},
        "rollback": {"version"},
        "benchmark": {"runs"},
    }
    given = {
        k
        for k in ("name", "version", "sha256", "size", "chunks_sha256", "runs")
        if getattr(cmd, k) is not None
    }
    extra = given - takes.get(cmd.op, set())
    return f"{cmd.op} does not take {', '.join(sorted(extra))}" if extra else None


def _benchmark(agent: Agent, cmd: Command) -> tuple[bool, str, dict[str, Any]]:
    c, stats = agent.cfg.commands, agent.bench_stats
    if agent.session is None or agent.golden is None:
        return False, "no active model", {}
    if not isinstance(agent.golden, GoldenSet):
        # TTFT and decode speed are measured by the self-test before activation (selftest_llm)
        return False, "the benchmark command measures tensor models, not text generation", {}
    runs = cmd.runs if cmd.runs is not None else agent.cfg.install.bench_runs
    if not 1 <= runs <= c.bench_max_runs:
        return False, f"runs must be between 1 and {c.bench_max_runs}", {}
    wait = agent.bench_budget.wait_s()
    if wait > 0:
        stats.refused += 1
        if math.isinf(wait):
            return False, "benchmarks are off on this device (commands.bench_budget_s = 0)", {}
        return (
            False,
            f"benchmark budget spent ({c.bench_budget_s:g} s a minute): "
            f"try again in {math.ceil(wait)} s",
            {"retry_after_s": math.ceil(wait)},
        )
    before = agent.thermal.read()
    power = WindowPower()
    power.add(agent.power.read())
    t0 = time.monotonic()
    try:
        # Not agent.latency: a benchmark is not served traffic (telemetry, canary gate).
        lat = selftest.benchmark(agent.session, agent.golden, runs, agent.bench_tick, c.bench_max_s)
    finally:
        used = time.monotonic() - t0
        agent.bench_budget.spend(used)
        stats.commands += 1
        stats.seconds += used
    stats.runs += lat.runs
    after = agent.thermal.read()
    power.add(agent.power.read())
    # The warm-up runs used energy in the same span: they count as inferences too.
    energy = energy_fields(power.result(used), lat.runs + selftest.WARMUP_RUNS)
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
    return (
        True,
        "",
        {
            "runs": lat.runs,
            "requested_runs": runs,
            "p50_ms": round(lat.p50_ms, 4),
            "p95_ms": round(lat.p95_ms, 4),
            "p99_ms": round(lat.p99_ms, 4),
            "max_ms": round(lat.max_ms, 4),
            "model": a.label if a else None,
            "thermal": thermal,
            **energy,
        },
    )


def handle_command(agent: Agent, cmd: Command) -> CommandResult:
    ok, reason, detail = True, "", dict[str, Any]()
    if cmd.op not in COMMAND_OPS:
        ok, reason = False, f"unknown op '{cmd.op[:64]}' (one of {', '.join(COMMAND_OPS)})"
    elif (problem := _args_problem(cmd)) is not None:
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
        if not (cmd.name and cmd.version and cmd.sha256 and cmd.size and cmd.chunks_sha256):
            ok, reason = False, "deploy needs name, version, sha256, size and chunks_sha256"
        else:
            fields = ("name", "version", "sha256", "size", "chunks_sha256")
            try:
                dep = validate(
                    Deployment,
                    {**{f: getattr(cmd, f) for f in fields}, "deployed_at": f"cmd:{cmd.id}"},
                )
            except MessageError as exc:
                ok, reason = False, f"invalid deploy command: {exc}"
            else:
                agent.deploy_command(dep)
    return CommandResult(id=cmd.id, ok=ok, reason=reason, detail=detail)


def on_command(agent: Agent, topic: str, payload: bytes) -> None:
    """Decode, run and answer one command on cmd/result."""
    result_topic = topics.device_topic(agent.dev, "cmd/result")
    try:
        env, new = agent.policy.trust.open(
            payload, "command", Target(device=agent.dev), topic, MAX_CONTROL_BYTES
        )
        if not new:
            # The command acted on last, again: a QoS 1 duplicate or a captured copy replayed.
            # Not acted on twice, and not answered twice, but said in an event so a replay
            # leaves a trace like every other refused message.
            agent.out.bad(
                topic,
                f"command {command_id(payload) or ''} (counter {env.signed.counter}) delivered "
                "again: already acted on, ignored",
            )
            return
        cmd = validate(Command, env.signed.body)
        # Acted on from here: a replay of this envelope is refused even if the command fails.
        agent.policy.trust.commit(topic, env)
    except (TrustError, MessageError) as exc:
        agent.out.bad(topic, str(exc))
        cmd_id = command_id(payload)
        if cmd_id is not None:  # the sender waits for this id: tell it why
            agent.t.publish(
                result_topic, encode(CommandResult(id=cmd_id, ok=False, reason=str(exc)))
            )
        return
    try:
        res = handle_command(agent, cmd)
    except Exception as exc:  # a bug: answer, keep serving
        log.exception("command %s failed", cmd.op)
        res = CommandResult(
            id=cmd.id, ok=False, reason=f"internal error: {type(exc).__name__}: {exc}"
        )
    agent.t.publish(result_topic, encode(res))


def rollback(agent: Agent, cmd_id: str, version: str | None = None) -> tuple[bool, str]:
    """Roll back to the kept ``version`` (default: the previous one); (ok, reason)."""
    target = None
    a = agent.active
    if version is not None:
        if a is not None and version in (a.manifest.version, a.label, a.dir.name):
            return False, f"{a.label} is already the active version"
        target = agent.versions.find(version)
        if target is None:
            kept = ", ".join(i.label for i in agent.versions.kept()) or "none"
            return False, f"version {version} is not kept on this device (kept: {kept})"
    else:
        # the newest kept version that may serve (its key trusted, at or above its line's floor);
        # else the newest kept one, refused below with its reason
        target = agent.installer.previous() or agent.versions.previous()
    if target is not None and (problem := agent.allowed(target)) is not None:
        reason = f"cannot roll back to {target.label}: {problem}"
        agent.out.event("command", reason=reason, subject=target, detail={"command": cmd_id})
        return False, reason
    if agent.installer.rollback(
        f"rollback requested by command {cmd_id}", by_command=True, target=target
    ):
        return True, ""
    if target is not None:
        return False, f"{target.label} does not load; it was removed"
    return False, "no previous version to roll back to"


def status(agent: Agent) -> dict[str, Any]:
    job = agent.job
    return {
        "device": agent.dev,
        "active": a.model_dump() if (a := agent.out.active_model()) else None,
        "probation": agent.probation is not None,
        "phase": agent.machine.phase.value,
        "fetching": None
        if job is None or job.store is None
        else {"sha256": job.sha, "done": job.store.count_done, "chunks": len(job.store.done)},
        # the deployment in flight (name, version, sha256, age_s, what it waits for), or None
        "pending": p.model_dump() if (p := agent.fetcher.pending()) else None,
        "dropped_messages": agent.dropped,
        "kept": [i.label for i in agent.versions.kept()],
        "commands": {"pending": agent.pending_commands, "refused_busy": agent.refused_busy},
        "benchmarks": {
            "commands": agent.bench_stats.commands,
            "runs": agent.bench_stats.runs,
            "seconds": round(agent.bench_stats.seconds, 3),
            "refused": agent.bench_stats.refused,
            "budget_left_s": round(agent.bench_budget.left(), 3),
        },
    }
