"""Inference runtimes behind one interface, discovered so a missing backend only disables itself."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from agent.errors import DependencyError, UsageError
from agent.runtime.base import InferenceSession, IOSpec

log = logging.getLogger(__name__)

# runtime name -> module holding a `load(path, threads, providers)` function
_ADAPTERS = {
    "onnxruntime": "agent.runtime.onnxruntime_adapter",
    "litert": "agent.runtime.litert_adapter",
}
# text-generation runtimes -> module holding `load_generator(folder, threads, providers)`
# (agent.runtime.textgen.load_generator): a TextGenerator, not an InferenceSession
_GENERATORS = {
    "onnxruntime-genai": "agent.runtime.genai_adapter",
}


def is_text_generation(runtime: str) -> bool:
    return runtime in _GENERATORS


def available_runtimes() -> list[str]:
    """Runtimes whose adapter imports here (logged, not raised, when one does not)."""
    found = []
    for name, module in {**_ADAPTERS, **_GENERATORS}.items():
        try:
            mod = importlib.import_module(module)
            if mod.is_available():
                found.append(name)
        except ImportError as exc:  # pragma: no cover - depends on the device
            log.info("runtime %s unavailable: %s", name, exc)
    return found


def load_session(
    runtime: str,
    model_path: Path,
    threads: int = 1,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> InferenceSession:
    if runtime in _GENERATORS:
        raise UsageError(f"runtime '{runtime}' generates text: load it with load_generator")
    if runtime not in _ADAPTERS:
        raise UsageError(f"unknown runtime '{runtime}' (known: {', '.join(_ADAPTERS)})")
    try:
        mod = importlib.import_module(_ADAPTERS[runtime])
    except ImportError as exc:
        raise DependencyError(f"runtime '{runtime}' is not usable here: {exc}") from None
    session: InferenceSession = mod.load(model_path, threads=threads, providers=providers)
    return session


__all__ = [
    "IOSpec",
    "InferenceSession",
    "available_runtimes",
    "is_text_generation",
    "load_session",
]
