"""The vad example's metric: how often a candidate makes the same speech/non-speech call as fp32."""

from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLD = 0.5  # silero-vad's default speech threshold


def decision_agreement(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: Any
) -> float:
    """Fraction of steps where p(speech) > 0.5 agrees between the candidate and fp32 (higher is better)."""
    got = np.asarray(outputs["output"]).reshape(-1) > THRESHOLD
    ref = np.asarray(reference["output"]).reshape(-1) > THRESHOLD
    return float(np.mean(got == ref))
