"""In-process inference on the active model, through the same holder and recorder as the endpoint."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from agent.errors import EdgefleetError, ModelError
from agent.serve.holder import Loaded, SessionHolder
from agent.telemetry.latency import LatencyRecorder

if TYPE_CHECKING:
    from agent.monitor.capture import Capture

Arrays = dict[str, npt.NDArray[np.generic]]


class NoModelError(EdgefleetError):
    """No model is active on this device yet (the endpoint answers 503)."""

    exit_code = 4


class InferenceError(ModelError):
    """The runtime failed on inputs that passed validation."""


class LocalModel:
    """``infer({name: array}) -> {name: array}`` on whatever model is active when it is called.

    A swap during a call does not affect it: the call keeps a reference on the model it began with.
    """

    def __init__(
        self, holder: SessionHolder, recorder: LatencyRecorder, capture: Capture | None = None
    ) -> None:
        self.holder, self.recorder, self.capture = holder, recorder, capture

    @property
    def active(self) -> Loaded | None:
        return self.holder.current

    def infer(self, feeds: Arrays) -> Arrays:
        holder = self.holder
        loaded = holder.acquire()
        if loaded is None:  # not a model error: telemetry's errors count failed inferences only
            raise NoModelError("no model is active")
        try:
            t0 = time.perf_counter()
            out = loaded.session.infer(feeds)
            s = time.perf_counter() - t0
        except Exception as exc:  # a runtime's own error types
            self.recorder.error()
            raise InferenceError(
                f"{loaded.name} {loaded.version}: inference failed: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            holder.release(loaded)
        mon = loaded.monitor
        if mon is not None:
            mon.offer(feeds, out, s)
        if self.capture is not None:
            self.capture.offer(loaded, feeds, out)
        self.recorder.record(s * 1000.0)
        return out
