"""The active model behind a refcount, so a swap never breaks a request that is running.

Requests ``acquire`` the current model and ``release`` it when they finish; ``swap`` makes a
new model current at once, and the old session is closed only when its last request released
it. The worker thread swaps; any number of request threads acquire.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from agent.monitor.monitor import Monitor
from agent.runtime import InferenceSession, IOSpec
from agent.runtime.textgen import GeneratorSession, TextGenerator

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Loaded:
    """One loaded model version: its session and what the endpoint reports about it."""

    name: str
    version: str
    sha256: str
    runtime: str
    session: InferenceSession
    inputs: list[IOSpec] = field(default_factory=list)
    outputs: list[IOSpec] = field(default_factory=list)
    refs: int = 0
    retired: bool = False
    # Drift monitor built from this version's reference.json (None: no reference, or disabled).
    monitor: Monitor | None = None
    # A text-generation model: what /generate and /v1/chat/completions run; taken from the
    # session when it is a GeneratorSession (no tensors: /infer answers 400), which closes it.
    generator: TextGenerator | None = None

    @classmethod
    def text(
        cls, name: str, version: str, sha256: str, runtime: str, generator: TextGenerator
    ) -> Loaded:
        """A loaded text-generation model (manifest task "text-generation")."""
        return cls(name, version, sha256, runtime, GeneratorSession(generator, [], []))

    def __post_init__(self) -> None:
        if self.generator is None and isinstance(self.session, GeneratorSession):
            self.generator = self.session.generator
        if not self.inputs:
            self.inputs = [_served(self.runtime, s) for s in self.session.inputs]
        if not self.outputs:
            self.outputs = [_served(self.runtime, s) for s in self.session.outputs]


def _served(runtime: str, spec: IOSpec) -> IOSpec:
    """The dtype callers exchange: an adapter (de)quantizes a quantized int8 tensor from/to float32;
    an int8/uint8 tensor without a scale is exchanged as it is."""
    if spec.quantized and spec.dtype in ("int8", "uint8"):
        return IOSpec(spec.name, "float32", spec.shape)
    return spec


class SessionHolder:
    """Thread-safe: holds the current ``Loaded`` (or None) and counts who is using each one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Loaded | None = None

    @property
    def current(self) -> Loaded | None:
        """The current model, without taking a reference (for metadata only)."""
        return self._current

    # acquire/release sit on every inference's path: bare lock calls, no context managers.
    def acquire(self) -> Loaded | None:
        """Take a reference on the current model; None when no model is loaded."""
        lock = self._lock
        lock.acquire()
        cur = self._current
        if cur is not None:
            cur.refs += 1
        lock.release()
        return cur

    def release(self, loaded: Loaded) -> None:
        lock = self._lock
        lock.acquire()
        loaded.refs -= 1
        close = loaded.retired and loaded.refs == 0
        lock.release()
        if close:
            _close(loaded)

    def swap(self, new: Loaded | None) -> Loaded | None:
        """Make ``new`` current; the previous one is closed once no request uses it. Returns it."""
        with self._lock:
            old, self._current = self._current, new
            close = False
            if old is not None and old is not new:
                old.retired = True
                close = old.refs == 0
        if close and old is not None:
            _close(old)
        return old

    def close(self) -> None:
        """Shut down: no current model; the last one closes when its requests finish."""
        self.swap(None)


def _close(loaded: Loaded) -> None:
    try:
        loaded.session.close()  # a GeneratorSession closes its generator
    except Exception:  # a runtime's own error must not take a request thread down
        log.exception("closing %s %s", loaded.name, loaded.version)
