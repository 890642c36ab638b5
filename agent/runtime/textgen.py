"""The text-generation interface: what a loaded LLM offers the agent (self-test, serving).

Kept free of onnxruntime_genai so the serving side, the self-test and unit tests import it on
any device; the adapter that implements it is agent/runtime/genai_adapter.py.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.errors import DependencyError, ModelError, UsageError
from agent.runtime.base import InferenceSession, IOSpec


@dataclass(frozen=True)
class GenParams:
    """How to sample: temperature 0 is greedy (what golden prompts and tests use)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Token:
    """One generated token: its id and the text it adds (decoded through a token stream)."""

    id: int
    text: str


class TextGenerator(Protocol):
    """A loaded text-generation model."""

    name: str

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat: the model's chat template with a generation prompt."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(
        self,
        prompt_ids: list[int],
        params: GenParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[Token]:
        """Yield tokens as produced; stop at EOS, max_new_tokens, a stop string (not yielded)
        or when ``cancel`` is set."""
        ...

    def close(self) -> None: ...


class StopMatcher:
    """Holds back text that may be the start of a stop string so it is never yielded.

    ``feed`` returns the text safe to emit now and whether a stop string was completed;
    ``flush`` returns what was held back once generation ends without a stop.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stop:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        # keep the longest tail that is a proper prefix of some stop string
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


def apply_stops(pieces: Iterator[tuple[int, str]], stop: tuple[str, ...]) -> Iterator[Token]:
    """Turn (id, text) pieces into Tokens, ending before any stop string.

    Text that may begin a stop string is held back with its tokens; a held token is yielded with
    the text released after it (its own ``text`` is then ""), and whatever is still held when
    the pieces end without a stop is yielded last.
    """
    if not any(stop):
        for tid, text in pieces:
            yield Token(tid, text)
        return
    matcher = StopMatcher(stop)
    held: list[int] = []
    for tid, text in pieces:
        out, stopped = matcher.feed(text)
        if stopped:
            # the text before the stop string still belongs to the answer
            if out:
                owners = held or [tid]
                for h in owners[:-1]:
                    yield Token(h, "")
                yield Token(owners[-1], out)
            return
        held.append(tid)
        if out:
            for h in held[:-1]:
                yield Token(h, "")
            yield Token(held[-1], out)
            held = []
    rest = matcher.flush()
    for i, h in enumerate(held):
        yield Token(h, rest if i == len(held) - 1 else "")


class GeneratorSession(InferenceSession):
    """A TextGenerator where the agent holds an InferenceSession (the installer, the serving
    holder): ``generator`` is the model; tensor ``infer`` is refused."""

    def __init__(self, generator: TextGenerator, inputs: list[IOSpec], outputs: list[IOSpec]):
        self.generator = generator
        self._inputs, self._outputs = inputs, outputs

    @property
    def inputs(self) -> list[IOSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[IOSpec]:
        return self._outputs

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        raise ModelError("a text-generation model answers generate requests, not tensor infer")

    def close(self) -> None:
        self.generator.close()


def load_generator(
    model_dir: Path,
    threads: int = 1,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> TextGenerator:
    """Load an onnxruntime-genai model folder (genai_config.json, weights, tokenizer)."""
    try:
        mod = importlib.import_module("agent.runtime.genai_adapter")
    except ImportError as exc:  # pragma: no cover - the adapter itself imports lazily
        raise DependencyError(f"runtime 'onnxruntime-genai' is not usable here: {exc}") from None
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: not a model folder")
    generator: TextGenerator = mod.load_generator(model_dir, threads=threads, providers=providers)
    return generator


__all__ = [
    "GenParams",
    "GeneratorSession",
    "StopMatcher",
    "TextGenerator",
    "Token",
    "apply_stops",
    "load_generator",
]
