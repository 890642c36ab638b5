"""A deterministic, tiny TextGenerator for unit tests of the logic above it (self-test, serving).

Tokens are UTF-8 bytes offset by 3 (0 is EOS, 1 BOS, 2 unused), so encode/decode round-trip any
text and a multi-byte character spans several tokens, like a real BPE tokenizer: ``Token.text``
comes from an incremental decoder, so it is "" for a token that ends mid-character.
The reply is ``reply`` (or ``reply_fn(prompt)``) followed by EOS.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Iterator

from agent.runtime.textgen import GenParams, Token, apply_stops

EOS = 0
_OFFSET = 3


class FakeGenerator:
    name = "fake"

    def __init__(
        self,
        reply: str = "Hello from the fake model.",
        reply_fn: Callable[[str], str] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.reply = reply
        self.reply_fn = reply_fn
        self.delay_s = delay_s
        self.closed = False
        self.calls = 0  # generate() calls started
        self.active = 0  # generations in progress now
        self.max_active = 0  # the most ever in progress at once
        self._lock = threading.Lock()

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        parts = [f"<|{m['role']}|>{m['content']}\n" for m in messages]
        return "".join(parts) + "<|assistant|>"

    def encode(self, text: str) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - _OFFSET for i in ids if i >= _OFFSET)
        return data.decode("utf-8", errors="replace")

    def reply_ids(self, prompt_ids: list[int]) -> list[int]:
        """The ids ``generate`` yields greedily for this prompt (EOS not included)."""
        text = self.reply_fn(self.decode(prompt_ids)) if self.reply_fn else self.reply
        return self.encode(text)

    def generate(
        self,
        prompt_ids: list[int],
        params: GenParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[Token]:
        if self.closed:
            raise RuntimeError("generator is closed")
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from self._run(prompt_ids, params, cancel)
        finally:
            with self._lock:
                self.active -= 1

    def _run(
        self, prompt_ids: list[int], params: GenParams, cancel: threading.Event | None
    ) -> Iterator[Token]:
        yield from apply_stops(self._pieces(prompt_ids, params, cancel), params.stop)

    def _pieces(
        self, prompt_ids: list[int], params: GenParams, cancel: threading.Event | None
    ) -> Iterator[tuple[int, str]]:
        ids = [*self.reply_ids(prompt_ids), EOS]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for n, tid in enumerate(ids):
            if n >= params.max_new_tokens or (cancel is not None and cancel.is_set()):
                return
            if self.delay_s:
                time.sleep(self.delay_s)
            if tid == EOS:
                return
            yield tid, decoder.decode(bytes([tid - _OFFSET]))

    def close(self) -> None:
        self.closed = True
