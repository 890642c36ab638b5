"""`edgefleet inspect` lines for a text-generation artifact's metrics, budgets and golden prompts."""

from __future__ import annotations

from typing import Any

from agent.protocol.manifest import DEFAULT_PREFIX_TOKENS, Manifest


def llm_lines(m: Manifest) -> list[str]:
    met: dict[str, Any] = m.metrics
    lines = []
    if "token_agreement" in met:
        lines.append(
            f"quality    next-token agreement {met['token_agreement'] * 100:.1f}% and greedy "
            f"agreement {met['greedy_agreement'] * 100:.1f}% (first {met['greedy_tokens']} tokens) "
            f"with the float model; perplexity {met['perplexity']:.2f} "
            f"(float {met['perplexity_ref']:.2f}, {met['perplexity_increase_pct']:+.1f}%)"
        )
    if "ttft_ms" in met:
        lines.append(
            f"speed      TTFT {met['ttft_ms']:.1f} ms, decode {met['decode_tok_s']:.1f} tokens/s, "
            f"load {met['load_s']:.2f} s (build host, {met.get('threads', '?')} threads)"
        )
    if "peak_rss_mb" in met:
        lines.append(f"memory     peak RSS {met['peak_rss_mb']:.1f} MB")
    b = m.budgets or {}
    if "max_ttft_ms" in b:
        lines.append(
            f"budgets    model <= {b['max_artifact_mb']:g} MB, agreement >= {b['min_token_agreement']:g}, "
            f"greedy >= {b['min_greedy_agreement']:g}, perplexity <= +{b['max_perplexity_increase_pct']:g}%, "
            f"TTFT <= {b['max_ttft_ms']:g} ms, decode >= {b['min_decode_tok_s']:g} tok/s, "
            f"RSS <= {b['max_ram_mb']:g} MB"
        )
    prefix = m.golden.prefix_tokens or DEFAULT_PREFIX_TOKENS
    lines.append(
        f"golden     {m.golden.count} prompts; the device must reproduce the first {prefix} "
        "greedy tokens of each"
    )
    return lines
