"""Differential privacy of the monitor's released window ([monitor] dp_epsilon).

Every count the window releases (each histogram bin, each class count, the observation,
non-finite and low-confidence counts, the confidence sum) gets Laplace noise of scale
sensitivity / epsilon, and is clipped at 0. One binned value changes one histogram count by 1,
so the sensitivity is 1 per binned value; see docs/protocol.md for how epsilon composes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def laplace(
    counts: npt.NDArray[Any],
    epsilon: float | None,
    rng: np.random.Generator,
    sensitivity: float = 1.0,
) -> npt.NDArray[np.float64]:
    """``counts`` with Laplace(sensitivity / epsilon) noise on each, clipped at 0; unchanged
    (as float) when ``epsilon`` is None (off)."""
    c = np.asarray(counts, dtype=np.float64)
    if epsilon is None:
        return c
    noisy = c + rng.laplace(0.0, sensitivity / epsilon, size=c.shape)
    return np.maximum(noisy, 0.0)


def laplace_scalar(
    value: float, epsilon: float | None, rng: np.random.Generator, sensitivity: float = 1.0
) -> float:
    return float(laplace(np.asarray([value]), epsilon, rng, sensitivity)[0])
