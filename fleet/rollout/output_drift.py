"""The canary gate's output-drift check: does the new model predict a different class mix than
the model it replaces, on the same traffic and in the same period?

A canary's own ``monitor`` block scores drift against the *new* artifact's reference profile,
which says whether the canary's inputs look like the new model's build data, not whether it
behaves like the old model. So the gate compares predicted-class counts instead: the canaries'
windows on the new model against the windows that the group's not-yet-updated members report
for the old model while the canary phase runs. The figure is the Jensen-Shannon divergence of
the two class distributions, in bits: symmetric, defined when one side has a class the other
never predicted (unlike KL or PSI without smoothing), and bounded in [0, 1], so one threshold
means the same for any number of classes. A difference of max drift scores was rejected: the
two sides' scores are measured against different references and do not compare.
"""

from __future__ import annotations

import math
from typing import Literal

Check = Literal["wait", "ok", "fail"]


def js_divergence(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count tables; 0 when either is empty."""
    sp, sq = sum(p.values()), sum(q.values())
    if sp <= 0 or sq <= 0:
        return 0.0
    js = 0.0
    for k in set(p) | set(q):
        a, b = p.get(k, 0.0) / sp, q.get(k, 0.0) / sq
        m = (a + b) / 2
        if a > 0:
            js += 0.5 * a * math.log2(a / m)
        if b > 0:
            js += 0.5 * b * math.log2(b / m)
    return min(max(js, 0.0), 1.0)


def add_counts(into: dict[str, float], counts: dict[str, float]) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0.0) + n


def check(
    device: str,
    new: dict[str, float],
    old: dict[str, float],
    threshold: float,
    min_samples: int,
) -> tuple[Check, str]:
    """Compare a canary's class counts (``new``) with the old model's on the rest (``old``).

    wait (with a reason, shown if the canary phase times out) until each side has
    ``min_samples`` predictions; fail when the divergence exceeds ``threshold``.
    """
    n_new, n_old = sum(new.values()), sum(old.values())
    if n_new < min_samples or n_old < min_samples:
        return "wait", (
            f"{device}: output drift: waiting for class counts ({n_new:g} predictions on the new "
            f"model, {n_old:g} from not-yet-updated members; {min_samples} needed on each side)"
        )
    js = js_divergence(new, old)
    if js <= threshold:
        return "ok", ""
    # the class whose share moved most, to make the figure concrete
    k = max(
        sorted(set(new) | set(old)),
        key=lambda c: abs(new.get(c, 0) / n_new - old.get(c, 0) / n_old),
    )
    return "fail", (
        f"{device}: output drift: class distribution JS divergence {js:.3f} from the old model "
        f"on the rest of the group > {threshold:g} allowed (class {k}: "
        f"{new.get(k, 0) / n_new:.0%} on the canary vs {old.get(k, 0) / n_old:.0%} on the old "
        f"model; {n_new:g} vs {n_old:g} predictions)"
    )
