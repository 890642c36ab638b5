"""Text-generation build configs: sources, prompts, per-model budgets, and the budget gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError, UsageError
from agent.protocol.profile import LlmBudgets, get_profile
from builder.candidate import Candidate
from builder.llm.build import SELECT, violations
from builder.llm.config import effective_llm, is_llm_config, load_llm_config

BASE = """
name = "chat"
version = "1.0.0"
task = "text-generation"
[model]
{source}
[eval]
prompts = ["Hi"]
held_text = "Some text to score."
"""


def _write(tmp: Path, source: str = 'gguf = "m.gguf"', extra: str = "") -> Path:
    (tmp / "m.gguf").write_bytes(b"GGUF")
    path = tmp / "edgefleet.toml"
    path.write_text(BASE.format(source=source) + extra)
    return path


def test_a_text_generation_config_loads_and_merges_budgets(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        extra='[budgets]\nmax_ttft_ms = 900\n[profiles.x86-ipc]\ncandidates = ["int4"]\n'
        'select = "fastest"\nbudgets = { max_artifact_mb = 100 }\n',
    )
    assert is_llm_config(path)
    cfg = load_llm_config(path)
    assert cfg.source_path() == tmp_path / "m.gguf"
    assert cfg.held_text().startswith("Some text")
    llm = effective_llm(get_profile("x86-ipc"), cfg)
    assert llm.candidates == ("int4",) and llm.select == "fastest"
    assert llm.budgets.max_artifact_mb == 100 and llm.budgets.max_ttft_ms == 900
    rpi = effective_llm(get_profile("rpi4"), cfg)
    assert rpi.budgets.max_ttft_ms == 900 and rpi.budgets.max_artifact_mb == 220


@pytest.mark.parametrize(
    ("source", "extra", "needle"),
    [
        ('gguf = "m.gguf"\nhf_dir = "x"', "", "exactly one of gguf"),
        ('gguf_package = "nopkg"', "", "package:file.gguf"),
        ('gguf = "m.gguf"', "[budgets]\nmax_p95_ms = 3\n", "unknown budget max_p95_ms"),
        ('gguf = "m.gguf"', '[profiles.rpi4]\ncandidates = ["int3"]\n', "unknown int3"),
    ],
)
def test_bad_configs_say_what_is_wrong(
    tmp_path: Path, source: str, extra: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_llm_config(_write(tmp_path, source, extra))


def test_missing_sources_and_profiles_without_llm(tmp_path: Path) -> None:
    cfg = load_llm_config(_write(tmp_path, 'gguf_package = "no_such_pkg_x:m.gguf"'))
    with pytest.raises(UsageError, match="not installed"):
        cfg.source_path()
    cfg = load_llm_config(_write(tmp_path, 'gguf = "missing.gguf"'))
    with pytest.raises(UsageError, match="does not exist"):
        cfg.source_path()
    with pytest.raises(ConfigError, match="no \\[llm\\] section"):
        effective_llm(get_profile("generic-cpu"), cfg)


def _metrics(**over: float) -> dict[str, float]:
    m = {
        "model_bytes": 90e6,
        "token_agreement": 0.9,
        "greedy_agreement": 0.5,
        "perplexity": 10.0,
        "perplexity_increase_pct": 5.0,
        "ttft_ms": 100.0,
        "decode_tok_s": 50.0,
        "peak_rss_mb": 300.0,
    }
    m.update(over)
    return m


def test_violations_name_every_missed_budget() -> None:
    b = LlmBudgets(
        max_artifact_mb=100,
        max_ttft_ms=200,
        min_decode_tok_s=10,
        max_ram_mb=500,
        min_token_agreement=0.85,
        min_greedy_agreement=0.4,
        max_perplexity_increase_pct=10,
    )
    assert violations(_metrics(), b) == []
    bad = _metrics(
        model_bytes=120e6,
        token_agreement=0.5,
        greedy_agreement=0.1,
        perplexity_increase_pct=30,
        ttft_ms=300,
        decode_tok_s=5,
        peak_rss_mb=600,
    )
    got = violations(bad, b)
    assert len(got) == 7 and got[0] == "size 120 MB > 100 MB"


def test_selection_orders() -> None:
    small = Candidate("int4", "x", metrics=_metrics(model_bytes=90e6, decode_tok_s=40))
    fast = Candidate("int8", "x", metrics=_metrics(model_bytes=270e6, decode_tok_s=90))
    good = Candidate("a", "x", metrics=_metrics(token_agreement=0.99))
    assert min([small, fast], key=SELECT["smallest"]) is small
    assert min([small, fast], key=SELECT["fastest"]) is fast
    assert min([small, good], key=SELECT["most_accurate"]) is good
