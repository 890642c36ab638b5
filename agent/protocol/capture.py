"""Feedback capture settings: the agent's [capture] config section and the ``capture`` keys of
a signed deployment (messages.Deployment) are the same model, so the fleet checks the keys an
operator signs exactly as the device will read them (agent.monitor.capture.settings_for)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CaptureConfig(BaseModel):
    """[capture]: feedback capture of served samples, off by default (agent.monitor.capture).

    A signed deployment's ``capture`` keys override these for that deployment's model. The keys
    are checked against this model on the device and by the fleet before signing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    sample_rate: float = Field(default=0.01, ge=0, le=1)
    max_per_hour: int = Field(default=100, ge=0, le=1_000_000)
    max_bytes_per_hour: int = Field(default=1_000_000, ge=0, le=2**34)
    triggers: list[Literal["sample", "low_confidence", "drift", "label"]] = [
        "sample",
        "low_confidence",
        "drift",
        "label",
    ]
    outputs_only: bool = False
    # "file.py:function" on the device: (inputs, outputs) -> (inputs, outputs) or None (drop).
    redact: str | None = None
    queue_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=2**34)

    @field_validator("redact")
    @classmethod
    def _redact(cls, v: str | None) -> str | None:
        if v is not None and (":" not in v or not v.rsplit(":", 1)[1].isidentifier()):
            raise ValueError("must be 'file.py:function'")
        return v
