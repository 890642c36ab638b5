"""`edgefleet inspect`: verify an artifact (signature, every file hash) and print its manifest,
measured figures and compression report as text or JSON.

Named inspect_artifact rather than inspect so that nothing here can shadow the standard
library's inspect module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Trusted ed25519 public key (PEM); repeat for several.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verified manifest as JSON.")
def inspect_cmd(artifact: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Verify ARTIFACT (signature and every file hash) and print its manifest."""
    from agent.protocol.artifact import verify_artifact
    from agent.protocol.signing import load_public_key

    va = verify_artifact(artifact, [load_public_key(k) for k in keys])
    m = va.manifest
    from builder.compression_report import read_report, summary_lines

    report = read_report(artifact, m)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "verified": True,
                    "sha256": va.sha256,
                    "key_id": va.key_id,
                    "manifest": m.to_dict(),
                    "report": report,
                },
                indent=2,
            )
        )
        return
    met = m.metrics
    lines = [
        f"artifact   {artifact}  (sha256 {va.sha256})",
        f"verified   signature by key {va.key_id}; {len(m.files)} files match their sha256",
        f"model      {m.name} {m.version} for profile {m.profile} ({m.runtime}, {m.precision}, {m.task})",
        f"recipe     {m.recipe.name}: {' -> '.join(s.name for s in m.recipe.steps)}",
        f"created    {m.created} by edgefleet {m.builder_version}",
    ]
    if m.is_text_generation:
        from builder.llm.summary import llm_lines

        lines += [f"{k:10} {s.name} {s.dtype} {s.shape}" for k, s in _io(m)] + llm_lines(m)
        lines += [
            f"file       {n:30} {e.size:>10} bytes  {e.sha256[:16]}"
            for n, e in sorted(m.files.items())
        ]
        click.echo("\n".join(lines))
        return
    for io_kind, specs in (("input", m.model.inputs), ("output", m.model.outputs)):
        for s in specs:
            q = (
                f" scale={s.quantization.scale:g} zp={s.quantization.zero_point}"
                if s.quantization
                else ""
            )
            lines.append(f"{io_kind:10} {s.name} {s.dtype} {s.shape}{q}")
    if "top1" in met:
        lines.append(
            f"accuracy   top-1 {met['top1'] * 100:.2f}% (fp32 {met['top1_ref'] * 100:.2f}%, drop {met['top1_drop_pt']:.2f} pt)"
        )
    if "cosine_min" in met and "top1" not in met:
        lines.append(
            f"accuracy   vs fp32: min cosine {met['cosine_min']:.4f}, mean {met['cosine_mean']:.4f}, "
            f"max abs error {met['max_abs_err']:.4g}, max rel error {met['max_rel_err']:.4g}"
        )
    if "metric" in met:
        lines.append(
            f"metric     {met['metric']:.4g} (fp32 {met['metric_ref']:.4g}, drop {met['metric_drop']:.4g})"
        )
    if m.budgets:
        b = m.budgets
        gated = (
            f"top-1 drop <= {b['max_accuracy_drop_pt']:g} pt"
            if m.task == "classification"
            else f"min cosine >= {b['min_cosine']:g}"
        )
        lines.append(
            f"budgets    {gated}, model <= {b['max_artifact_kb']:g} KB, p95 <= {b['max_p95_ms']:g} ms, "
            f"RSS <= {b['max_ram_mb']:g} MB"
        )
    if "latency_b1" in met:
        lat = met["latency_b1"]
        ratio = (
            f", x{lat['p95_ratio']:.2f} the fp32 p95" if lat.get("p95_ratio") is not None else ""
        )
        lines.append(
            f"latency    p50 {lat['p50_ms']:.3f} ms, p95 {lat['p95_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms "
            f"(build host, batch 1{ratio})"
        )
    if "peak_rss_mb" in met:
        lines.append(f"memory     peak RSS {met['peak_rss_mb']:.1f} MB")
    lines.append(f"golden     {m.golden.count} vectors, atol {m.golden.atol:.3g}")
    for name, e in sorted(m.files.items()):
        lines.append(f"file       {name:14} {e.size:>10} bytes  {e.sha256[:16]}")
    lines += summary_lines(report) if report else []
    click.echo("\n".join(lines))


def _io(m: Any) -> list[tuple[str, Any]]:
    return [("input", s) for s in m.model.inputs] + [("output", s) for s in m.model.outputs]
