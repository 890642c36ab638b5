"""Golden prompts for text-generation artifacts (a JSON file named by the manifest's golden).

    {"prompts": [{"messages": [{"role": "user", "content": "..."}],
                  "max_new_tokens": N,
                  "tokens": [greedy token ids the model produced on the build host]}]}

The device replays each prompt greedily and must reproduce the first ``prefix_tokens`` expected
tokens exactly (manifest golden.prefix_tokens): later tokens may flip between CPUs, where a
near-tie in the logits falls the other way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import IntegrityError
from agent.protocol.validation import format_validation_error

MAX_GOLDEN_BYTES = 4 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class GoldenPrompt(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    max_new_tokens: int = Field(ge=1, le=4096)
    tokens: list[int] = Field(min_length=1)

    def chat(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


class GoldenPrompts(_Strict):
    prompts: list[GoldenPrompt] = Field(min_length=1)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, data: object, source: str = "golden.json") -> GoldenPrompts:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise IntegrityError(format_validation_error(source, exc)) from None

    @classmethod
    def load(cls, path: Path) -> GoldenPrompts:
        if path.stat().st_size > MAX_GOLDEN_BYTES:
            raise IntegrityError(f"{path.name}: more than {MAX_GOLDEN_BYTES} bytes")
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{path.name}: not valid JSON") from None
        return cls.parse(data, path.name)


def prefix_mismatch(expected: list[int], got: list[int], prefix: int) -> int | None:
    """The first position < ``prefix`` where ``got`` differs from ``expected`` (a short ``got``
    counts as a difference where it ends), or None when the prefix matches."""
    need = min(prefix, len(expected))
    for i in range(need):
        if i >= len(got) or got[i] != expected[i]:
            return i
    return None
