"""The builder's commands (profiles, passes, build, inspect); the `edgefleet` command
(agent/clikit.py) gathers them with the fleet's."""

from __future__ import annotations

import json
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import click

from agent import __version__
from agent.clikit import run_cli
from agent.errors import BudgetError, EdgefleetError, UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _console(stderr: bool = True) -> Any:
    """A rich console; when piped, wide enough that tables are not cut to 80 columns."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=160)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="edgefleet")
def cli() -> None:
    """edgefleet builder: compress a trained model for each kind of edge device, measure it
    against the fp32 original, and pack the candidate that meets the device's budgets into a
    signed artifact.

    \b
    Typical first steps:
      edgefleet profiles                      # the device kinds and their budgets
      edgefleet keys generate --out keys/     # a signing key pair
      edgefleet build edgefleet.toml --all-profiles --key keys/edgefleet.key
      edgefleet inspect out/NAME-VERSION-PROFILE.efa --key keys/edgefleet.pub
    """


# ---------------------------------------------------------------- profiles / passes


@cli.command("profiles")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory of profile .toml files (default: ./device_profiles or $EDGEFLEET_PROFILES).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_cmd(directory: Path | None, as_json: bool) -> None:
    """List device profiles with their runtime, candidates and budgets (validates every file)."""
    from agent.protocol.profile import load_profiles

    profiles = load_profiles(directory)
    if as_json:
        click.echo(json.dumps([p.model_dump(mode="json") for p in profiles.values()], indent=2))
        return
    from rich.table import Table

    t = Table(title="device profiles")
    for col in (
        "profile",
        "arch",
        "runtime",
        "threads",
        "candidates",
        "select",
        "max size",
        "max drop",
        "max p95",
        "max RAM",
    ):
        t.add_column(col)
    for p in profiles.values():
        b = p.budgets
        t.add_row(
            p.name,
            p.hardware.arch,
            p.runtime.name,
            str(p.runtime.threads),
            ", ".join(p.build.candidates),
            p.build.select,
            f"{b.max_artifact_kb:g} KB",
            f"{b.max_accuracy_drop_pt:g} pt",
            f"{b.max_p95_ms:g} ms",
            f"{b.max_ram_mb:g} MB",
        )
    _console(stderr=False).print(t)


@cli.command("passes")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the passes and their options as JSON.")
def passes_cmd(name: str | None, as_json: bool) -> None:
    """List the registered passes and what each accepts; with NAME, that pass's options
    (the `config = { ... }` keys a recipe step may set), their types and defaults."""
    from builder.passes import REGISTRY, get_pass

    if name is not None and name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(REGISTRY)})")
    docs: list[dict[str, Any]] = []
    for n in [name] if name else list(REGISTRY):
        try:
            p = get_pass(n)
        except EdgefleetError as exc:
            docs.append({"name": n, "error": str(exc)})
            continue
        options = []
        for key, f in p.config_class.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            ann = f.annotation
            text = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            options.append(
                {"name": key, "type": text, "required": f.is_required(), "default": default}
            )
        docs.append(
            {
                "name": n,
                "accepts": [k.value for k in p.accepts],
                "description": p.description,
                "options": options,
            }
        )
    if as_json:
        click.echo(json.dumps(docs, indent=2, default=str))
        return
    for d in docs:
        if "error" in d:
            click.echo(f"{d['name']:14} unavailable: {d['error']}")
            continue
        acc = "/".join(d["accepts"]) or "(source)"
        click.echo(f"{d['name']:14} {acc:12} {d['description']}")
        if name:
            for o in d["options"]:
                dflt = "required" if o["required"] else f"default {o['default']!r}"
                click.echo(f"    {o['name']:28} {o['type']:40} {dflt}")
    if not name:
        click.echo("\n`edgefleet passes NAME` shows a pass's options.")


# ---------------------------------------------------------------- build


def _speed(m: dict[str, Any]) -> str:
    """p50/p95 at batch 1 and the ratio to fp32; TTFT and tokens/s for a text-generation model."""
    from builder.compression_report import speed_cell

    return speed_cell(m)


def _table(results: list[Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    from builder.compression_report import accuracy_cells, size_cell

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
                _speed(m),
                f"{m['peak_rss_mb']:.0f} MB" if m else "-",
                verdict,
            )
    return t


def _quiet_libraries() -> None:
    """Libraries a model factory imports log warnings at import that say nothing about the
    build (torchao's missing CUDA kernels, torch's pytree deprecations): keep them off the
    user's terminal, and keep Hugging Face libraries offline (nothing is downloaded)."""
    import logging
    import os

    for name in ("torchao", "torch.utils._pytree", "torch._dynamo", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _step_times(steps: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{s['pass']} " + ("cached" if s["cached"] else f"{s['seconds']:.2f}s") for s in steps
    )


@cli.command("build")
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--profile",
    "-p",
    "profile_names",
    multiple=True,
    help="Device profile name or .toml path; repeat for several.",
)
@click.option(
    "--all-profiles", is_flag=True, help="Build for every profile in the profiles directory."
)
@click.option(
    "--profiles-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where profile names are looked up (default: ./device_profiles).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("out"),
    show_default=True,
    help="Directory for the artifacts (NAME-VERSION-PROFILE.efa).",
)
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    default=None,
    help="ed25519 private key (PEM) that signs the artifacts (default: signing_key in CONFIG).",
)
@click.option("--version", "version", default=None, help="Override the version in CONFIG.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=Path(".edgefleet-cache"),
    show_default=True,
    help="Where pass results are cached between candidates and builds.",
)
@click.option(
    "--check", is_flag=True, help="Only validate CONFIG, profiles, data and recipes; build nothing."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the summary as one JSON document on stdout."
)
def build_cmd(
    config: Path,
    profile_names: tuple[str, ...],
    all_profiles: bool,
    profiles_dir: Path | None,
    out_dir: Path,
    key: Path | None,
    version: str | None,
    cache_dir: Path,
    check: bool,
    as_json: bool,
) -> None:
    """Build CONFIG (a TOML build configuration) for one or more device profiles.

    For each profile every candidate recipe it lists is built, measured against the fp32
    reference (accuracy, latency, peak RSS, size) and checked against the budgets; the best
    candidate that fits is signed and written to OUT. Exits non-zero if a profile has none.

    A config with task = "text-generation" builds a small LLM (a GGUF file or a Hugging Face
    folder) into onnxruntime-genai candidates gated on each profile's [llm] budgets
    (examples/smollm2/edgefleet.toml).
    """
    from agent.protocol.profile import get_profile, load_profiles
    from agent.protocol.signing import load_private_key
    from builder.config import load_build_config
    from builder.search import Builder, no_fit_error

    _quiet_libraries()

    from builder.llm.config import is_llm_config, load_llm_config

    llm = is_llm_config(config)  # task = "text-generation": onnxruntime-genai candidates
    cfg: Any = load_llm_config(config) if llm else load_build_config(config)
    if version:
        from agent.protocol.manifest import VERSION_RE

        if not VERSION_RE.match(version):
            raise UsageError(f"--version {version!r}: must be dotted integers such as 1.2.0")
        cfg = cfg.model_copy(update={"version": version})
    if all_profiles == bool(profile_names):
        raise UsageError("name profiles with --profile NAME (repeatable) or use --all-profiles")
    profiles = (
        list(load_profiles(profiles_dir).values())
        if all_profiles
        else [get_profile(n, profiles_dir) for n in profile_names]
    )
    key_path = key or (cfg.resolve(cfg.signing_key) if cfg.signing_key else None)
    if key_path is None:
        raise UsageError("no signing key: pass --key PATH or set signing_key in the config")
    signing_key = load_private_key(key_path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{cache_dir}: cannot create cache directory ({exc.strerror})") from None
    console = _console()
    status: AbstractContextManager[Any] = (
        nullcontext() if as_json or not console.is_terminal else console.status("building")
    )

    def progress(msg: str) -> None:
        if hasattr(status, "update"):
            status.update(msg)
        elif not as_json:
            console.print(f"[dim]{msg}[/dim]")

    with status:
        if llm:
            from builder.llm.build import LlmBuilder

            builder: Any = LlmBuilder(cfg, signing_key, cache_dir, progress)
        else:
            builder = Builder(cfg, signing_key, cache_dir, progress)
        checked = builder.check(profiles)  # every recipe chain is valid before anything runs
        if check:
            if as_json:
                click.echo(json.dumps({"ok": True, "checked": checked}))
            else:
                click.echo(
                    f"OK: {config} is valid; {len(checked)} recipe chains checked ({', '.join(checked)})"
                )
            return
        results = []
        for p in profiles:
            results.append(builder.build_profile(p, out_dir))
    failed = [r for r in results if r.chosen is None]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": not failed,
                    "name": cfg.name,
                    "version": cfg.version,
                    "profiles": [r.summary() for r in results],
                },
                default=str,
            )
        )
    else:
        _console(stderr=False).print(_table(results))
        for r in results:
            for c in r.candidates:
                if c.steps:
                    click.echo(f"  {r.profile.name}/{c.recipe}: {_step_times(c.steps)}")
        for r in results:
            if r.artifact:
                click.echo(
                    f"{r.profile.name}: {r.artifact}"
                    + (f"  (report: {r.report})" if r.report else "")
                )
    if failed:
        raise (
            no_fit_error(failed[0])
            if len(failed) == 1
            else BudgetError("; ".join(str(no_fit_error(r)) for r in failed))
        )


# ---------------------------------------------------------------- inspect


@cli.command("inspect")
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


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """The builder's commands alone (`edgefleet`, in agent/clikit.py, gathers them with the
    fleet's): user errors print one line and exit with their code; bugs keep tracebacks."""
    return run_cli(cli, argv, "edgefleet")


if __name__ == "__main__":
    sys.exit(main())
