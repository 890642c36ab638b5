"""Deployment state names, their categories and the p95 regression rule: one definition.

The agent reports these names in its events (``Event.state``); the rollout, the fleet report and
the views judge devices by the same categories, so a state is in progress, failed or terminal in
one place. The agent's own phases (including the ones only install.json knows, ACTIVATING and
PROBATION) are in ``agent.deploy.machine``; each maps to one of these names.
"""

from __future__ import annotations

from typing import Literal, get_args

DeployState = Literal[
    "FETCHING",
    "VERIFIED",
    "UNPACKED",
    "SELF_TEST",
    "ACTIVE",
    "HEALTHY",
    "ROLLED_BACK",
    "REJECTED",
]
DEPLOY_STATES: tuple[DeployState, ...] = get_args(DeployState)

# Past verification and before activation: the agent finishes this install whatever it receives.
INSTALLING: tuple[DeployState, ...] = ("VERIFIED", "UNPACKED", "SELF_TEST")
# Working towards the new artifact; the previous model still serves.
IN_PROGRESS: tuple[DeployState, ...] = ("FETCHING", *INSTALLING)
# The new artifact serves (on probation while ACTIVE).
SERVING: tuple[DeployState, ...] = ("ACTIVE", "HEALTHY")
# The new artifact does not serve, and why is in the event's reason.
FAILED: tuple[DeployState, ...] = ("ROLLED_BACK", "REJECTED")
# An attempt ends here; a later event for the same artifact is a new attempt.
TERMINAL: tuple[DeployState, ...] = ("HEALTHY", *FAILED)


def p95_limit_ms(old_p95_ms: float, max_regression_pct: float, slack_ms: float) -> float:
    """The highest p95 a new model may show against ``old_p95_ms`` measured the same way.

    Used by the agent's self-test (candidate vs the current model, on the device) and by the
    rollout's canary gate (the on-device figures from the ACTIVE event, and telemetry).
    """
    return old_p95_ms * (1 + max_regression_pct / 100.0) + slack_ms


def p95_regressed(
    new_p95_ms: float, old_p95_ms: float, max_regression_pct: float, slack_ms: float
) -> bool:
    """True when ``new_p95_ms`` is worse than the rule allows (see ``p95_limit_ms``)."""
    return new_p95_ms > p95_limit_ms(old_p95_ms, max_regression_pct, slack_ms)
