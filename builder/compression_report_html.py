"""The compression report as one self-contained HTML page (inline SVG charts, no network).

Written beside the artifact (NAME-VERSION-PROFILE.report.html): every candidate the search
tried with its figures and verdict, then the chosen one's report.json: parameters, bytes and
latency by layer type, quantization sensitivity, layers kept in float, distillation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.htmlkit import esc
from builder.compression_report import accuracy_cells

_CSS = """body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.ok{color:#070}.bad{color:#a00}.skip{color:#888}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}svg text{font:12px system-ui,sans-serif}"""


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def bar_chart(
    title: str,
    rows: list[tuple[str, float]],
    unit: str,
    limit: float | None = None,
    width: int = 640,
) -> str:
    """Horizontal bars, one per (label, value); an optional dashed line marks a budget."""
    if not rows:
        return ""
    top = max([v for _, v in rows] + ([limit] if limit else [])) or 1.0
    left, bar_w, h = 190, width - 290, 22
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h * len(rows) + 40}" role="img">',
        f'<title>{esc(title)}</title><text x="0" y="14" font-weight="bold">{esc(title)}</text>',
    ]
    for i, (label, v) in enumerate(rows):
        y = 26 + i * h
        w = max(1.0, bar_w * v / top)
        parts.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{esc(label)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{h - 7}" fill="#4a7fb5"/>'
            f'<text x="{left + w + 5:.1f}" y="{y + 14}">{_num(v)} {esc(unit)}</text>'
        )
    if limit:
        x = left + bar_w * limit / top
        parts.append(
            f'<line x1="{x:.1f}" y1="22" x2="{x:.1f}" y2="{26 + h * len(rows)}" stroke="#a00" stroke-dasharray="4 3"/>'
            f'<text x="{x + 3:.1f}" y="{34 + h * len(rows)}" fill="#a00">budget {limit:g} {esc(unit)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _verdict(c: Any, chosen: Any) -> tuple[str, str]:
    if c is chosen:
        return "CHOSEN", "ok"
    if c.skipped:
        return f"skipped: {c.error}", "skip"
    if c.error:
        return f"error: {c.error}", "bad"
    if c.violations:
        return "over budget: " + "; ".join(c.violations), "bad"
    return "fits", "ok"


def render(result: Any) -> str:
    """The page for one profile's ProfileResult."""
    p, chosen = result.profile, result.chosen
    b = p.budgets
    rows, classes = [], []
    for c in result.candidates:
        m = c.metrics
        verdict, cls = _verdict(c, chosen)
        acc, vs = accuracy_cells(m)
        rows.append(
            [
                c.recipe,
                c.runtime or "-",
                c.precision or "-",
                f"{m['model_bytes'] / 1024:.1f} KB" if m else "-",
                acc,
                vs,
                f"{m['latency_b1']['p50_ms']:.3f} / {m['latency_b1']['p95_ms']:.3f} ms"
                if m
                else "-",
                verdict,
            ]
        )
        classes.append(cls)
    built = [c for c in result.candidates if c.metrics]
    gated = (
        f"top-1 drop &le; {b.max_accuracy_drop_pt:g} pt"
        if chosen is None or "top1" in chosen.metrics
        else f"min cosine to fp32 &ge; {b.min_cosine:g}"
    )
    body = [
        f"<h1>edgefleet compression report: {esc(chosen.report.get('recipe') if chosen else '-')} for {esc(p.name)}</h1>",
        f"<p>{esc(p.description)}. Runtime {esc(p.runtime.name)}, {p.runtime.threads} thread(s); "
        f"the search picks the <b>{esc(p.build.select.replace('_', ' '))}</b> candidate that meets every budget "
        f"(model size &le; {b.max_artifact_kb:g} KB, {gated}, "
        f"p95 &le; {b.max_p95_ms:g} ms, peak RSS &le; {b.max_ram_mb:g} MB).</p>",
        "<h2>Candidates</h2>",
        _table(
            [
                "recipe",
                "runtime",
                "precision",
                "model size",
                "accuracy",
                "vs fp32",
                "p50 / p95 (b1)",
                "verdict",
            ],
            rows,
            classes,
        ),
        bar_chart(
            "model size by candidate",
            [(c.recipe, c.metrics["model_bytes"] / 1024) for c in built],
            "KB",
            b.max_artifact_kb,
        ),
        bar_chart(
            "p95 latency at batch 1 (build host)",
            [(c.recipe, c.metrics["latency_b1"]["p95_ms"]) for c in built],
            "ms",
        ),
    ]
    if chosen is not None:
        body.append(chosen_section(chosen.report))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>edgefleet report {esc(p.name)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def chosen_section(r: dict[str, Any]) -> str:
    """Layers, sensitivity and distillation of the chosen candidate's report.json."""
    s = r.get("summary", {})
    out = [
        f"<h2>Chosen: {esc(r['recipe'])} ({esc(r['runtime'])}, {esc(r['precision'])})</h2>",
        _table(
            [
                "model bytes",
                "params",
                "top-1",
                "fp32 top-1",
                "min / mean cosine",
                "p95 (b1)",
                "peak RSS",
            ],
            [
                [
                    s.get("model_bytes"),
                    s.get("params") if s.get("params") is not None else "-",
                    f"{s['top1'] * 100:.2f}%" if s.get("top1") is not None else "-",
                    f"{s['top1_ref'] * 100:.2f}%" if s.get("top1_ref") is not None else "-",
                    f"{s['cosine_min']:.4f} / {s['cosine_mean']:.4f}"
                    if s.get("cosine_min") is not None
                    else "-",
                    f"{s['p95_ms']:.3f} ms" if s.get("p95_ms") is not None else "-",
                    f"{s['peak_rss_mb']:.1f} MB" if s.get("peak_rss_mb") is not None else "-",
                ]
            ],
        ),
        "<h2>By layer type</h2>",
    ]
    layers = r.get("layers", [])
    out.append(
        _table(
            ["op type", "count", "params", "bytes"],
            [[x["op"], x["count"], x["params"], x["bytes"]] for x in layers],
        )
    )
    out.append(
        bar_chart(
            "parameters by layer type",
            [(x["op"], x["params"]) for x in layers if x["params"]],
            "params",
        )
    )
    lat = r.get("latency_by_op")
    out.append(f"<h2>Latency by op type</h2><p>{esc(r.get('latency_source', ''))}.</p>")
    if lat:
        out.append(
            _table(
                ["executed op", "ms / run", "share"],
                [[e["op"], f"{e['ms']:.4f}", f"{100 * e['share']:.1f}%"] for e in lat],
            )
        )
        out.append(
            bar_chart(
                "share of host time by executed op (batch 1)",
                [(e["op"], 100 * e["share"]) for e in lat],
                "%",
            )
        )
    sens = r.get("sensitivity")
    if sens:
        out.append(
            "<h2>Quantization sensitivity (SQNR with only that layer in int8; lower is more sensitive)</h2>"
        )
        out.append(
            _table(
                ["node", "op", "SQNR (dB)", "max |err|"],
                [[e["node"], e["op"], e["sqnr_db"], f"{e['max_abs_err']:.3g}"] for e in sens],
            )
        )
        out.append(bar_chart("SQNR by layer", [(e["node"], e["sqnr_db"]) for e in sens], "dB"))
    if r.get("kept_float") is not None:
        out.append(f"<p>Layers kept in float: {esc(', '.join(r['kept_float']) or 'none')}.</p>")
    d = r.get("distill")
    if d:
        out.append("<h2>Distillation: student vs teacher</h2>")
        out.append(
            _table(
                ["", "teacher", "student"],
                [
                    ["params", d["teacher_params"], d["student_params"]],
                    [
                        "top-1 (eval)",
                        f"{d.get('teacher_top1', 0) * 100:.2f}%",
                        f"{d.get('student_top1', 0) * 100:.2f}%",
                    ],
                    [
                        "torch p50 (b1)",
                        f"{d['teacher_p50_ms_torch']:.3f} ms",
                        f"{d['student_p50_ms_torch']:.3f} ms",
                    ],
                ],
            )
        )
    lr = r.get("lowrank_layers")
    if lr:
        out.append("<h2>Low-rank factorization</h2><pre>" + esc(lr) + "</pre>")
    return "".join(out)


def report_path(artifact: Path) -> Path:
    name = artifact.name[: -len(".efa")] if artifact.name.endswith(".efa") else artifact.name
    return artifact.with_name(f"{name}.report.html")


def write_html_report(result: Any, artifact: Path) -> Path:
    out = report_path(artifact)
    tmp = out.with_name(f".{out.name}.part")
    tmp.write_text(render(result), encoding="utf-8")
    tmp.replace(out)
    return out
