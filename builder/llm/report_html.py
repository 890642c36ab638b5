"""The HTML compression report of a text-generation build: every candidate with its agreement,
perplexity, speed, memory and verdict, charts against the budgets, and the chosen one's steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.htmlkit import esc
from agent.protocol.profile import Llm
from builder.compression_report import accuracy_cells, size_cell, speed_cell
from builder.compression_report_html import _CSS, _table, _verdict, bar_chart, report_path


def render_llm(result: Any, llm: Llm) -> str:
    p, chosen, b = result.profile, result.chosen, llm.budgets
    rows, classes = [], []
    for c in result.candidates:
        m = c.metrics
        verdict, cls = _verdict(c, chosen)
        acc, vs = accuracy_cells(m)
        rows.append(
            [
                c.recipe,
                size_cell(m),
                acc,
                vs,
                f"{m['perplexity']:.2f} (float {m['perplexity_ref']:.2f})" if m else "-",
                speed_cell(m) if m else "-",
                f"{m['peak_rss_mb']:.0f} MB" if m else "-",
                verdict,
            ]
        )
        classes.append(cls)
    built = [c for c in result.candidates if c.metrics]
    body = [
        f"<h1>edgefleet LLM report: {esc(chosen.recipe if chosen else '-')} for {esc(p.name)}</h1>",
        f"<p>{esc(p.description)}. onnxruntime-genai, {p.llm_threads} thread(s); the search picks "
        f"the <b>{esc(llm.select.replace('_', ' '))}</b> candidate that meets every budget "
        f"(size &le; {b.max_artifact_mb:g} MB, next-token agreement with the float model &ge; "
        f"{b.min_token_agreement:g}, greedy agreement &ge; {b.min_greedy_agreement:g}, perplexity "
        f"&le; +{b.max_perplexity_increase_pct:g}%, TTFT &le; {b.max_ttft_ms:g} ms, decode &ge; "
        f"{b.min_decode_tok_s:g} tokens/s, peak RSS &le; {b.max_ram_mb:g} MB).</p>",
        "<h2>Candidates</h2>",
        _table(
            [
                "candidate",
                "model size",
                "agreement",
                "vs float",
                "perplexity",
                "speed",
                "peak RSS",
                "verdict",
            ],
            rows,
            classes,
        ),
        bar_chart(
            "model size",
            [(c.recipe, c.metrics["model_bytes"] / 1e6) for c in built],
            "MB",
            b.max_artifact_mb,
        ),
        bar_chart(
            "next-token agreement with the float model",
            [(c.recipe, c.metrics["token_agreement"] * 100) for c in built],
            "%",
            b.min_token_agreement * 100,
        ),
        bar_chart(
            "decode speed (build host)",
            [(c.recipe, c.metrics["decode_tok_s"]) for c in built],
            "tok/s",
            b.min_decode_tok_s,
        ),
    ]
    if chosen is not None:
        steps = ", ".join(
            f"{s['pass']} {'cached' if s['cached'] else str(s['seconds']) + ' s'}"
            for s in chosen.steps
        )
        body.append(f"<h2>Chosen: {esc(chosen.recipe)}</h2><p>steps: {esc(steps)}</p>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>edgefleet LLM report "
        f"{esc(p.name)}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def write_llm_report(result: Any, llm: Llm, artifact: Path) -> Path:
    out = report_path(artifact)
    tmp = out.with_name(f".{out.name}.part")
    tmp.write_text(render_llm(result, llm), encoding="utf-8")
    tmp.replace(out)
    return out
