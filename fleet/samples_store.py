"""Captured samples (devices/{id}/samples) in the fleet database: one ``samples`` row per
message, its tensors kept as the JSON they came in (dtype, shape, base64 data).

Samples are far larger than telemetry, so they have their own bound (``SampleLimit``, 4 MB by
default): a larger one is refused, counted and logged once, never parsed. Each tensor's base64
is decoded and its length checked against dtype and shape here, so the exporter reads whole rows.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.protocol.messages import MessageError, Sample, SampleTensor, decode

log = logging.getLogger("edgefleet.collect")

MAX_SAMPLE_BYTES = 4 * 1024 * 1024
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


class SampleLimit:
    """The largest sample payload accepted; counts refusals and logs the first one."""

    def __init__(self, max_bytes: int = MAX_SAMPLE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.refused = 0

    def check(self, topic: str, size: int) -> str | None:
        """Why a payload of ``size`` bytes is refused, or None when it fits."""
        if size <= self.max_bytes:
            return None
        self.refused += 1
        reason = f"sample of {size} bytes exceeds the {self.max_bytes} allowed"
        if self.refused == 1:
            log.warning("%s on %s (further ones are only counted)", reason, topic)
        return reason


def tensor_problem(name: str, t: SampleTensor) -> str | None:
    """Why a captured tensor cannot be read back, or None when its bytes fit dtype and shape."""
    if t.dtype not in DTYPES:
        return f"tensor {name}: dtype {t.dtype!r} is not one of {', '.join(DTYPES)}"
    if any(d < 0 for d in t.shape) or len(t.shape) > 8:
        return f"tensor {name}: bad shape {t.shape}"
    try:  # decoded, not counted: the exporter decodes it the same way (validate=True)
        n = len(base64.b64decode(t.data, validate=True))
    except binascii.Error:
        return f"tensor {name}: data is not base64"
    want = math.prod(t.shape) * np.dtype(t.dtype).itemsize
    if n != want:
        return f"tensor {name}: {n} bytes of data, dtype and shape need {want}"
    return None


def _tensors(ts: dict[str, SampleTensor] | None) -> str | None:
    if ts is None:
        return None
    return json.dumps({k: v.model_dump() for k, v in ts.items()}, separators=(",", ":"))


def sample_row(dev: str, payload: bytes, received: float, max_bytes: int) -> tuple[Any, ...] | str:
    """The ``samples`` row of a message on devices/``dev``/samples, or why it is rejected."""
    try:
        try:
            msg = Sample.model_validate_json(payload)  # fast path; decode() words the reason
        except ValidationError:
            msg = decode(Sample, payload, max_bytes)
    except MessageError as exc:
        return str(exc)
    if msg.device != dev:
        return f"device '{msg.device}' in the payload does not match the topic"
    for part in (msg.inputs, msg.outputs):
        for name, t in (part or {}).items():
            if (problem := tensor_problem(name, t)) is not None:
                return problem
    m = msg.model
    label = None if msg.label is None else json.dumps(msg.label, separators=(",", ":"))
    return (
        dev,
        msg.seq,
        msg.ts,
        received,
        m.name,
        m.version,
        m.sha256,
        msg.trigger,
        msg.request_id,
        label,
        msg.redacted,
        len(payload),
        _tensors(msg.inputs),
        _tensors(msg.outputs),
    )
