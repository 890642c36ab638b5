"""onnxruntime-genai adapter: a folder with genai_config.json, the ONNX decoder and its tokenizer
becomes a TextGenerator (agent/runtime/textgen.py). Torch-free; imports onnxruntime_genai lazily
so a device without it only loses text generation."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.errors import ModelError, UsageError, missing_dependency
from agent.runtime.textgen import GenParams, Token, apply_stops

log = logging.getLogger(__name__)

# onnxruntime execution provider names -> onnxruntime-genai provider names
_PROVIDERS = {
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "OpenVINOExecutionProvider": "OpenVINO",
    "QNNExecutionProvider": "QNN",
    "WebGpuExecutionProvider": "WebGPU",
}


def is_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def _og() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise missing_dependency(
            "onnxruntime-genai", "agent,llm", "text generation (onnxruntime-genai runtime)"
        ) from None
    return og


class GenaiGenerator:
    """A loaded onnxruntime-genai model. Each ``generate`` call gets its own generator (and KV
    cache); the model and tokenizer are shared and safe to use from several threads."""

    def __init__(self, model_dir: Path, threads: int, providers: tuple[str, ...]) -> None:
        og = _og()
        if not (model_dir / "genai_config.json").is_file():
            raise UsageError(f"{model_dir}: no genai_config.json (not an onnxruntime-genai model)")
        self.name = model_dir.name
        try:
            config = og.Config(str(model_dir))
            session = {"intra_op_num_threads": max(1, threads), "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            config.clear_providers()
            for provider in providers:
                if provider in _PROVIDERS:
                    config.append_provider(_PROVIDERS[provider])
                    break
            self._model = og.Model(config)
            self._tokenizer = og.Tokenizer(self._model)
        except Exception as exc:  # onnxruntime_genai raises plain RuntimeError
            raise ModelError(
                f"{model_dir}: onnxruntime-genai cannot load the model: {exc}"
            ) from None
        self._og = og
        self._eos = set(int(t) for t in self._tokenizer.eos_token_ids)
        template = model_dir / "chat_template.jinja"
        self._template = template.read_text(encoding="utf-8") if template.is_file() else None
        self._context = _context_length(model_dir)
        self._closed = False

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        try:
            prompt: str = self._tokenizer.apply_chat_template(
                json.dumps(messages), template_str=self._template, add_generation_prompt=True
            )
        except Exception as exc:
            raise UsageError(f"cannot apply the chat template: {exc}") from None
        return prompt

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids)
        return text

    def generate(
        self,
        prompt_ids: list[int],
        params: GenParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[Token]:
        if self._closed:
            raise ModelError("the model is closed")
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if len(prompt_ids) >= self._context:
            raise UsageError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self._context}"
            )
        return apply_stops(self._pieces(prompt_ids, params, cancel), params.stop)

    def _pieces(
        self, prompt_ids: list[int], params: GenParams, cancel: threading.Event | None
    ) -> Iterator[tuple[int, str]]:
        og = self._og
        gp = og.GeneratorParams(self._model)
        max_length = min(self._context, len(prompt_ids) + params.max_new_tokens)
        search: dict[str, Any] = {"max_length": max_length, "batch_size": 1}
        if params.temperature > 0:
            search.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            search["top_k"] = 0  # 0: no top-k cut, only top_p
            if params.seed is not None:
                search["random_seed"] = params.seed
        else:
            search.update(do_sample=False, top_k=1)
        try:
            gp.set_search_options(**search)
            generator = og.Generator(self._model, gp)
            stream = self._tokenizer.create_stream()
            generator.append_tokens([prompt_ids])
        except Exception as exc:  # onnxruntime_genai raises plain RuntimeError
            raise ModelError(f"generation failed: {exc}") from None
        produced = 0
        while produced < params.max_new_tokens and not generator.is_done():
            if cancel is not None and cancel.is_set():
                return
            try:
                generator.generate_next_token()
                tid = int(generator.get_next_tokens()[0])
                text = "" if tid in self._eos else stream.decode(tid)
            except Exception as exc:
                raise ModelError(f"generation failed after {produced} tokens: {exc}") from None
            produced += 1
            if tid in self._eos:
                return
            yield tid, text

    def close(self) -> None:
        self._closed = True
        self.__dict__.pop("_tokenizer", None)
        self.__dict__.pop("_model", None)


def _context_length(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        return int(config["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 2048


def load_generator(
    model_dir: Path,
    threads: int = 1,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> GenaiGenerator:
    return GenaiGenerator(model_dir, threads, providers)
