"""Output parity between two models, with named tolerances and a per-output report."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from agent.errors import ParityError


def max_abs_diffs(
    expected: Mapping[str, npt.NDArray[np.floating]], actual: Mapping[str, npt.NDArray[np.floating]]
) -> dict[str, float]:
    out = {}
    for name, exp in expected.items():
        act = actual[name]
        if act.shape != exp.shape:
            out[name] = float("inf")
        else:
            out[name] = float(
                np.max(np.abs(act.astype(np.float64) - exp.astype(np.float64)), initial=0.0)
            )
    return out


def check_parity(
    what: str,
    expected: Mapping[str, npt.NDArray[np.floating]],
    actual: Mapping[str, npt.NDArray[np.floating]],
    atol: float,
    rtol: float,
) -> dict[str, float]:
    """Raise ParityError listing every output and its max difference if any is out of tolerance."""
    diffs = max_abs_diffs(expected, actual)
    bad = []
    for name, exp in expected.items():
        act = actual[name]
        if act.shape != exp.shape or not np.allclose(act, exp, atol=atol, rtol=rtol):
            bad.append(name)
    if bad:
        listing = ", ".join(f"{n}: max |diff| {d:.3g}" for n, d in diffs.items())
        raise ParityError(
            f"{what}: outputs differ beyond atol={atol:g}, rtol={rtol:g} ({listing})", diffs
        )
    return diffs
