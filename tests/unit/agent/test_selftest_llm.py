"""The text-generation self-test over the fake generator: golden prefixes, budgets, regression."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.deploy import selftest, selftest_llm
from agent.protocol.golden_llm import GoldenPrompts
from agent.protocol.manifest import FileEntry, Golden, Manifest, ModelInfo, Recipe, TensorSpec
from agent.runtime.base import IOSpec
from agent.runtime.textgen import GeneratorSession
from agent.store.versions import Installed
from tests.textgen_fake import FakeGenerator

_ENTRY = FileEntry(sha256="0" * 64, size=1)


def _installed(tmp: Path, budgets: dict[str, object] | None = None, prefix: int = 3) -> Installed:
    m = Manifest(
        format_version=1,
        name="chat",
        version="1.0.0",
        profile="x86-ipc",
        runtime="onnxruntime-genai",
        precision="int4",
        task="text-generation",
        created="2026-01-01T00:00:00+00:00",
        builder_version="test",
        model=ModelInfo(
            file="model",
            inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", 8])],
        ),
        files={"model/genai_config.json": _ENTRY, "golden.json": _ENTRY},
        metrics={},
        recipe=Recipe(name="int4", steps=[]),
        golden=Golden(file="golden.json", count=1, atol=0, rtol=0, prefix_tokens=prefix),
        budgets=budgets,
    )
    return Installed(tmp, m, "a" * 64)


def _golden(gen: FakeGenerator, tokens: list[int] | None = None) -> GoldenPrompts:
    messages = [{"role": "user", "content": "hi"}]
    ids = gen.encode(gen.chat_prompt(messages))
    expected = tokens if tokens is not None else gen.reply_ids(ids)
    return GoldenPrompts.parse(
        {"prompts": [{"messages": messages, "max_new_tokens": 16, "tokens": expected}]}
    )


def _session(gen: FakeGenerator) -> GeneratorSession:
    return GeneratorSession(gen, [IOSpec("input_ids", "int64", ("batch", "sequence"))], [])


def test_golden_prefix_must_match_only_up_to_prefix_tokens(tmp_path: Path) -> None:
    gen = FakeGenerator(reply="abcdef")
    inst = _installed(tmp_path, prefix=3)
    good = _golden(gen)
    assert selftest_llm.golden_check(gen, inst.manifest, good) is None
    late_flip = _golden(gen, [*good.prompts[0].tokens[:3], 1, 2])
    assert selftest_llm.golden_check(gen, inst.manifest, late_flip) is None
    early_flip = _golden(gen, [good.prompts[0].tokens[0], 7, 7])
    reason = selftest_llm.golden_check(gen, inst.manifest, early_flip)
    assert reason is not None and "token 1" in reason


def test_a_short_answer_fails_the_prefix(tmp_path: Path) -> None:
    gen = FakeGenerator(reply="a")
    expected = [*gen.reply_ids([]), 80, 81]
    reason = selftest_llm.golden_check(gen, _installed(tmp_path).manifest, _golden(gen, expected))
    assert reason is not None and "end of text" in reason


def test_check_candidate_passes_and_reports_speed(tmp_path: Path) -> None:
    gen = FakeGenerator(reply="hello world", delay_s=0.001)
    inst = _installed(tmp_path, {"max_ttft_ms": 1000, "min_decode_tok_s": 1})
    (tmp_path / "golden.json").write_text(_golden(gen).to_json())
    res = selftest.check_candidate(_session(gen), inst, 3, None, None, 1.0, None)
    assert res.ok, res.reason
    assert res.detail["runs"] == 3 and float(str(res.detail["decode_tok_s"])) > 0
    assert isinstance(res.golden, GoldenPrompts)


def test_budgets_reject(tmp_path: Path) -> None:
    gen = FakeGenerator(reply="hello world", delay_s=0.005)
    (tmp_path / "golden.json").write_text(_golden(gen).to_json())
    slow_first = _installed(tmp_path, {"max_ttft_ms": 0.001})
    res = selftest.check_candidate(_session(gen), slow_first, 2, None, None, 1.0, None)
    assert not res.ok and "TTFT p95" in res.reason
    slow_decode = _installed(tmp_path, {"min_decode_tok_s": 1e6})
    res = selftest.check_candidate(_session(gen), slow_decode, 2, None, None, 1.0, None)
    assert not res.ok and "tokens/s is below the budget" in res.reason


def test_a_slower_model_than_the_current_one_is_refused(tmp_path: Path) -> None:
    fast, slow = (
        FakeGenerator(reply="hello world"),
        FakeGenerator(reply="hello world", delay_s=0.01),
    )
    (tmp_path / "golden.json").write_text(_golden(slow).to_json())
    inst = _installed(tmp_path, {"max_ttft_regression_pct": 25, "max_decode_regression_pct": 20})
    current = (_session(fast), _golden(fast))
    res = selftest.check_candidate(_session(slow), inst, 2, None, None, 1.0, current)
    assert not res.ok and "current model" in res.reason
    assert "current_decode_tok_s" in res.detail


def test_a_wrong_golden_fails_with_a_reason(tmp_path: Path) -> None:
    gen = FakeGenerator(reply="abc")
    (tmp_path / "golden.json").write_text(_golden(gen, [9, 9, 9]).to_json())
    res = selftest.check_candidate(_session(gen), _installed(tmp_path), 2, None, None, 1.0, None)
    assert not res.ok and res.reason.startswith("self-test failed: prompt 0: token 0")
    (tmp_path / "golden.json").write_text("{not json")
    res = selftest.check_candidate(_session(gen), _installed(tmp_path), 2, None, None, 1.0, None)
    assert not res.ok and "golden vectors unreadable" in res.reason


def test_probe_and_warm_up_use_the_generator(tmp_path: Path) -> None:
    gen = FakeGenerator(reply="abc")
    golden = _golden(gen)
    session = _session(gen)
    selftest.warm_up(session, golden)
    assert gen.calls == 1
    assert selftest.golden_check(session, _installed(tmp_path), golden) is None
    session.close()
    assert gen.closed


def test_cancel_is_honoured_by_the_fake_during_a_benchmark() -> None:
    gen = FakeGenerator(reply="abcdef")
    cancel = threading.Event()
    cancel.set()
    assert list(gen.generate([1], selftest_llm.GenParams(), cancel)) == []


@pytest.mark.parametrize("genai_installed", [True, False])
def test_a_profile_with_llm_accepts_genai_artifacts_where_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, genai_installed: bool
) -> None:
    import agent.runtime
    from agent.config import load_config
    from agent.deploy.policy import resolve_policy
    from tests.agent_helpers import make_keys, write_config
    from tests.unit.agent.test_policy_selftest import PROFILE

    keys = make_keys(tmp_path / "k")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    llm = "\n[llm]\n[llm.budgets]\nmax_artifact_mb = 100\nmax_ttft_ms = 500\n"
    llm += "min_decode_tok_s = 5\nmax_ram_mb = 512\n"
    (profiles / "generic-cpu.toml").write_text(PROFILE + llm)
    path = write_config(
        tmp_path / "a.toml", "d", "mqtt://h:1", [keys.public], tmp_path / "s", profile="generic-cpu"
    )
    text = path.read_text().replace(
        'runtimes = ["onnxruntime"]', f'runtimes = []\nprofiles_dir = "{profiles}"'
    )
    path.write_text(text)
    present = ["onnxruntime", "onnxruntime-genai"] if genai_installed else ["onnxruntime"]
    monkeypatch.setattr(agent.runtime, "available_runtimes", lambda: present)
    policy = resolve_policy(load_config(path))
    expected = ("onnxruntime", "onnxruntime-genai") if genai_installed else ("onnxruntime",)
    assert policy.runtimes == expected


def test_a_zero_regression_budget_is_strict(tmp_path: Path) -> None:
    fast, slow = (
        FakeGenerator(reply="hello world"),
        FakeGenerator(reply="hello world", delay_s=0.01),
    )
    (tmp_path / "golden.json").write_text(_golden(slow).to_json())
    inst = _installed(tmp_path, {"max_ttft_regression_pct": 1000, "max_decode_regression_pct": 0})
    res = selftest.check_candidate(
        _session(slow), inst, 2, None, None, 1000.0, (_session(fast), _golden(fast))
    )
    assert not res.ok and "below the current model's" in res.reason


def test_the_benchmark_command_times_a_text_generation_model(tmp_path: Path) -> None:
    from tests.unit.agent.test_commands_budget import _agent, _results, _send, _wait

    agent, fake = _agent(tmp_path, bench_budget_s=5.0, bench_max_s=2.0)
    gen = FakeGenerator(reply="hello world", delay_s=0.001)
    agent.installer.session = _session(gen)
    agent.installer.golden = _golden(gen)
    _send(fake, "b1", "benchmark", runs=3)
    assert _wait(lambda: (agent.step(0.01), "b1" in _results(fake))[1], 10.0)
    res = _results(fake)["b1"]
    assert res["ok"], res
    d = res["detail"]
    assert d["runs"] == 3 and d["decode_tok_s"] > 0 and d["ttft_p95_ms"] >= 0
    assert d["model"] == "tiny@1.0.0" and gen.calls == 4  # a warm-up and three timed runs
