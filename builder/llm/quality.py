"""How close a candidate's text generation is to the float model's, on one prompt set:

* token_agreement: at every position of the float model's greedy answer, whether the candidate's
  top-1 next token (fed the float model's answer so far) is the float model's token;
* greedy_agreement: the share of the first N greedy tokens the candidate reproduces before its
  answer departs from the float model's (mean over prompts);
* perplexity on a held text.

Runs onnxruntime-genai in this process (logits are not in the agent's TextGenerator interface).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError


@dataclass
class Answers:
    """The float model's greedy answers to the prompts and its perplexity on the held text."""

    prompt_ids: list[list[int]]
    answers: list[list[int]]
    perplexity: float


class Scorer:
    """One loaded onnxruntime-genai model with the logits-level operations the metrics need."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime_genai as og

        self._og = og
        try:
            config = og.Config(str(folder))
            session = {"intra_op_num_threads": threads}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            # on the build host's CPU: an fp16 folder built for CUDA asks for it in its config
            config.clear_providers()
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:
            raise ModelError(f"{folder}: onnxruntime-genai cannot load it: {exc}") from None
        template = folder / "chat_template.jinja"
        self._template = template.read_text(encoding="utf-8") if template.is_file() else None
        self._eos = {int(t) for t in self.tokenizer.eos_token_ids}

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            json.dumps(messages), template_str=self._template, add_generation_prompt=True
        )
        return [int(t) for t in self.tokenizer.encode(text)]

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _generator(self, max_length: int) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False, top_k=1)
        return self._og.Generator(self.model, params)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        g = self._generator(len(ids) + n)
        g.append_tokens([ids])
        out: list[int] = []
        while len(out) < n and not g.is_done():
            g.generate_next_token()
            tid = int(g.get_next_tokens()[0])
            if tid in self._eos:
                break
            out.append(tid)
        return out

    def forced_top1(self, ids: list[int], continuation: list[int]) -> list[int]:
        """The top-1 next token at each position of ``continuation`` fed after ``ids``."""
        g = self._generator(len(ids) + len(continuation) + 1)
        g.append_tokens([ids])
        tops: list[int] = []
        for tid in continuation:
            tops.append(int(np.asarray(g.get_logits()).reshape(-1).argmax()))
            g.append_tokens([[tid]])
        return tops

    def perplexity(self, ids: list[int]) -> float:
        if len(ids) < 2:
            raise ModelError("the held text is shorter than two tokens")
        g = self._generator(len(ids) + 1)
        g.append_tokens([ids[:1]])
        nll = 0.0
        for tid in ids[1:]:
            logits = np.asarray(g.get_logits(), dtype=np.float64).reshape(-1)
            top = logits.max()
            nll -= logits[tid] - top - np.log(np.exp(logits - top).sum())
            g.append_tokens([[tid]])
        return float(np.exp(nll / (len(ids) - 1)))


def reference_answers(
    ref: Scorer, chats: list[list[dict[str, str]]], held: str, n: int, max_held: int
) -> Answers:
    prompt_ids = [ref.chat_ids(c) for c in chats]
    answers = [ref.greedy(ids, n) for ids in prompt_ids]
    return Answers(prompt_ids, answers, ref.perplexity(ref.encode(held)[:max_held]))


def compare(cand: Scorer, ref: Answers, held: str, n: int, max_held: int) -> dict[str, float]:
    """The candidate's agreement with the float model's answers, and its perplexity."""
    agree = total = 0
    shares: list[float] = []
    for ids, answer in zip(ref.prompt_ids, ref.answers, strict=True):
        if not answer:
            continue
        tops = cand.forced_top1(ids, answer)
        agree += sum(int(a == b) for a, b in zip(tops, answer, strict=True))
        total += len(answer)
        mine = cand.greedy(ids, len(answer))
        same = next((i for i, (a, b) in enumerate(zip(mine, answer, strict=False)) if a != b), None)
        shares.append((min(len(mine), len(answer)) if same is None else same) / len(answer))
    ppl = cand.perplexity(cand.encode(held)[:max_held])
    return {
        "token_agreement": agree / total if total else 0.0,
        "greedy_agreement": float(np.mean(shares)) if shares else 0.0,
        "greedy_tokens": n,
        "perplexity": ppl,
        "perplexity_ref": ref.perplexity,
        "perplexity_increase_pct": (ppl / ref.perplexity - 1.0) * 100.0,
    }
