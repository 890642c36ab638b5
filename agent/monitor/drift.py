"""Drift scores of a window's counts against the reference, and drift episodes.

Population stability index (PSI) for every binned input and output: it is the industry
convention for binned drift, with well-known thresholds (< 0.1 stable, 0.1-0.25 moderate,
> 0.25 significant), and on quantile bins each bin weighs the same. Jensen-Shannon divergence
(natural log, so at most ln 2) for the predicted-class distribution: it is bounded and
symmetric, and stays finite when a class never appears in one of the two, where PSI/KL
would need smoothing to say anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# A bin share below this counts as this: PSI is infinite for an empty bin otherwise.
EPS = 1e-4
# An episode ends when the score stays below threshold x END_RATIO (hysteresis): a score that
# hovers around the threshold does not open and close episodes window after window.
END_RATIO = 0.8


def psi(ref: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> float:
    """sum((q - p) ln(q / p)) of the window's shares q against the reference shares p."""
    n = int(counts.sum())
    if n == 0:
        return 0.0
    p = np.maximum(ref, EPS)
    q = np.maximum(counts / n, EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def js(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen-Shannon divergence (nats) of two distributions (normalised here); 0 when either is empty."""
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return 0.0
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: npt.NDArray[np.float64]) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log(x[nz] / m[nz])))

    return max(0.0, (kl(a) + kl(b)) / 2)


@dataclass
class Episode:
    """Drift on for ``windows`` windows in a row over ``threshold`` starts an episode; as many
    below threshold x END_RATIO end it. Windows under ``min_count`` observations count neither way."""

    threshold: float
    windows: int
    min_count: int
    drifting: bool = False
    streak: int = 0  # windows in a row on the other side of the state's boundary

    def update(self, count: int, score: float) -> str | None:
        """'start', 'end' or None for one window's max score."""
        if count < self.min_count:
            return None
        crossing = score < self.threshold * END_RATIO if self.drifting else score > self.threshold
        self.streak = self.streak + 1 if crossing else 0
        if self.streak < self.windows:
            return None
        self.drifting, self.streak = not self.drifting, 0
        return "start" if self.drifting else "end"
