"""`edgefleet build`: build a config for device profiles, gate every candidate on the budgets,
sign and write the one chosen for each (the search is builder/search.py, an LLM's
builder/llm/build.py), and print the results as a table or one JSON document."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import click

from agent.errors import BudgetError, UsageError
from builder.commands.render import results_table, rich_console, step_times


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


@click.command("build")
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
    from builder.profile_result import no_fit_error
    from builder.search import Builder

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
    console = rich_console()
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
        rich_console(stderr=False).print(results_table(results))
        for r in results:
            for c in r.candidates:
                if c.steps:
                    click.echo(f"  {r.profile.name}/{c.recipe}: {step_times(c.steps)}")
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
