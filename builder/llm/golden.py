"""The golden prompts of a text-generation artifact: the chosen candidate's own greedy tokens,
produced through the agent's adapter (the code path the device's self-test runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.protocol.golden_llm import GoldenPrompts
from agent.runtime.textgen import GenParams, load_generator


def golden_prompts(
    folder: Path, chats: list[list[dict[str, str]]], max_new_tokens: int
) -> GoldenPrompts:
    gen = load_generator(folder)
    try:
        prompts = []
        for chat in chats:
            ids = gen.encode(gen.chat_prompt(chat))
            tokens = [t.id for t in gen.generate(ids, GenParams(max_new_tokens=max_new_tokens))]
            if tokens:
                prompts.append(
                    {"messages": chat, "max_new_tokens": max_new_tokens, "tokens": tokens}
                )
    finally:
        gen.close()
    if not prompts:
        raise ModelError(f"{folder.name}: the model answers every golden prompt with end of text")
    return GoldenPrompts.parse(prompts and {"prompts": prompts}, "golden prompts")


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path
