"""How the builder's commands draw on a terminal: the rich console, and a build's results
table and per-step timings."""

from __future__ import annotations

from typing import Any


def rich_console(stderr: bool = True) -> Any:
    """A rich console; when piped, wide enough that tables are not cut to 80 columns."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=160)


def results_table(results: list[Any]) -> Any:
    """One row per candidate of each profile built (size, accuracy, speed, RSS, verdict), and
    one row for a profile that could not be built at all."""
    from rich.markup import escape
    from rich.table import Table

    # speed_cell: p50/p95 at batch 1 and the ratio to fp32; TTFT and tokens/s for an LLM.
    from builder.compression_report import accuracy_cells, size_cell, speed_cell

    t = Table(
        title="edgefleet build (size: model file; p50 / p95 at batch 1, interleaved with fp32; "
        "LLMs: TTFT and decode tokens/s)"
    )
    cols = (
        "profile",
        "runtime",
        "candidate",
        "precision",
        "size",
        "accuracy",
        "vs fp32",
        "p50 / p95 (b1)",
        "peak RSS",
        "verdict",
    )
    for col in cols:
        t.add_column(
            col,
            justify="right"
            if col in ("size", "accuracy", "vs fp32", "p50 / p95 (b1)", "peak RSS")
            else "left",
        )
    for r in results:
        if r.error:
            t.add_row(
                r.profile.name,
                r.profile.runtime.name,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"[red]profile not built: {escape(r.error)}[/red]",
            )
        for c in r.candidates:
            m = c.metrics
            chosen = r.chosen is c
            if c.skipped:
                verdict = f"[dim]skipped: {escape(c.error or '')}[/dim]"
            elif c.error:
                verdict = f"[red]error: {escape(c.error)}[/red]"
            elif c.violations:
                verdict = "[yellow]over budget: " + escape("; ".join(c.violations)) + "[/yellow]"
            else:
                verdict = "[bold green]CHOSEN[/bold green]" if chosen else "fits"
            acc, drop = accuracy_cells(m)
            t.add_row(
                r.profile.name,
                c.runtime or r.profile.runtime.name,
                c.recipe,
                c.precision or "-",
                size_cell(m),
                acc,
                drop,
                speed_cell(m),
                f"{m['peak_rss_mb']:.0f} MB" if m else "-",
                verdict,
            )
    return t


def step_times(steps: list[dict[str, Any]]) -> str:
    """A candidate's passes and the seconds each took ("cached" where nothing ran)."""
    return ", ".join(
        f"{s['pass']} " + ("cached" if s["cached"] else f"{s['seconds']:.2f}s") for s in steps
    )
