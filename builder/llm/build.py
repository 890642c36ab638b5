"""The text-generation build: candidates per profile, measured, gated, the best one packed.

What all profiles share is computed once: the float HF folder, the float (fp32 genai) reference
answers, each candidate's genai folder and its quality figures. Speed and memory are measured
per profile (its thread count) in a fresh process.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.errors import EdgefleetError
from agent.protocol.golden_llm import GoldenPrompts
from agent.protocol.manifest import (
    FORMAT_VERSION,
    Golden,
    Manifest,
    ModelInfo,
    Recipe,
    RecipeStep,
    TensorSpec,
)
from agent.protocol.profile import DeviceProfile, Llm, LlmBudgets
from builder.candidate import Candidate
from builder.llm import convert, quality
from builder.llm.config import CANDIDATES, REFERENCE, LlmBuildConfig, effective_llm
from builder.llm.golden import golden_prompts, write_json
from builder.llm.probe import probe
from builder.package import ensure_writable_dir, file_entry, write_artifact
from builder.profile_result import ProfileResult

log = logging.getLogger(__name__)

SELECT: dict[str, Callable[[Candidate], Any]] = {
    "smallest": lambda c: (c.metrics["model_bytes"], -c.metrics["decode_tok_s"]),
    "fastest": lambda c: (-c.metrics["decode_tok_s"], c.metrics["model_bytes"]),
    "most_accurate": lambda c: (-c.metrics["token_agreement"], c.metrics["perplexity"]),
}


def violations(m: dict[str, Any], b: LlmBudgets) -> list[str]:
    """Every budget ``m`` misses, each as a short phrase."""
    out = []
    mb = m["model_bytes"] / 1e6
    if mb > b.max_artifact_mb:
        out.append(f"size {mb:.0f} MB > {b.max_artifact_mb:g} MB")
    if m["token_agreement"] < b.min_token_agreement:
        out.append(f"token agreement {m['token_agreement']:.3f} < {b.min_token_agreement:g}")
    if m["greedy_agreement"] < b.min_greedy_agreement:
        out.append(f"greedy agreement {m['greedy_agreement']:.3f} < {b.min_greedy_agreement:g}")
    if m["perplexity_increase_pct"] > b.max_perplexity_increase_pct:
        out.append(
            f"perplexity +{m['perplexity_increase_pct']:.1f}% > {b.max_perplexity_increase_pct:g}%"
        )
    if m["ttft_ms"] > b.max_ttft_ms:
        out.append(f"TTFT {m['ttft_ms']:.0f} ms > {b.max_ttft_ms:g} ms")
    if m["decode_tok_s"] < b.min_decode_tok_s:
        out.append(f"decode {m['decode_tok_s']:.1f} tok/s < {b.min_decode_tok_s:g}")
    if m["peak_rss_mb"] > b.max_ram_mb:
        out.append(f"peak RSS {m['peak_rss_mb']:.0f} MB > {b.max_ram_mb:g} MB")
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in convert.model_files(folder).values())


class LlmBuilder:
    """Builds a text-generation config for profiles; ``progress`` gets a line per long step."""

    def __init__(
        self,
        cfg: LlmBuildConfig,
        key: Ed25519PrivateKey,
        cache_dir: Path,
        progress: Callable[[str], None],
    ) -> None:
        self.cfg, self.key, self.progress = cfg, key, progress
        self.source = cfg.source_path()
        self.held = cfg.held_text()
        self.chats = [self._chat(p) for p in cfg.eval.prompts]
        self.cache = cache_dir
        self._work: Path | None = None
        self._ref: quality.Answers | None = None
        self._folders: dict[str, Path] = {}
        self._quality: dict[str, dict[str, Any]] = {}
        self._steps: dict[str, list[dict[str, Any]]] = {}

    def _chat(self, prompt: str) -> list[dict[str, str]]:
        system = (
            [{"role": "system", "content": self.cfg.eval.system}] if self.cfg.eval.system else []
        )
        return [*system, {"role": "user", "content": prompt}]

    def check(self, profiles: list[DeviceProfile]) -> list[str]:
        """Validate before building anything: every profile has [llm] and known candidates."""
        convert.genai_version()
        return [f"{p.name}/{c}" for p in profiles for c in effective_llm(p, self.cfg).candidates]

    # -- shared across profiles ---------------------------------------------------------------
    def work(self) -> Path:
        if self._work is None:
            self.progress(f"hashing {self.source.name}")
            key = f"{convert.source_digest(self.source)[:16]}-genai{convert.genai_version()}"
            self._work = self.cache / "llm" / key
            self._work.mkdir(parents=True, exist_ok=True)
        return self._work

    def folder(self, name: str) -> Path:
        if name not in self._folders:
            steps = self._steps.setdefault(name, [])
            t0 = time.perf_counter()
            hf_cached = self.source.is_dir() or (self.work() / "hf" / "config.json").is_file()
            hf = convert.hf_folder(self.source, self.work(), self.progress)
            steps.append(_step("gguf_to_hf", t0, hf_cached))
            t0 = time.perf_counter()
            cached = (self.work() / f"genai-{name}" / "genai_config.json").is_file()
            self._folders[name] = convert.genai_folder(hf, name, self.work(), self.progress)
            steps.append(_step("genai_build", t0, cached))
        return self._folders[name]

    def reference(self) -> quality.Answers:
        if self._ref is None:
            ref = quality.Scorer(self.folder(REFERENCE))
            self.progress(f"float reference: greedy answers to {len(self.chats)} prompts")
            e = self.cfg.eval
            self._ref = quality.reference_answers(
                ref, self.chats, self.held, e.greedy_tokens, e.max_held_tokens
            )
        return self._ref

    def quality_of(self, name: str) -> dict[str, Any]:
        if name not in self._quality:
            ref = self.reference()
            self.progress(f"{name}: agreement and perplexity against the float model")
            t0 = time.perf_counter()
            e = self.cfg.eval
            scorer = quality.Scorer(self.folder(name))
            self._quality[name] = quality.compare(
                scorer, ref, self.held, e.greedy_tokens, e.max_held_tokens
            )
            self._steps[name].append(_step("quality", t0, False))
        return self._quality[name]

    # -- per profile --------------------------------------------------------------------------
    def candidate(self, profile: DeviceProfile, llm: Llm, name: str) -> Candidate:
        precision, provider, extra = CANDIDATES[name]
        cand = Candidate(name, profile.name, precision=name, runtime="onnxruntime-genai")
        if provider == "cuda" and "CUDAExecutionProvider" not in llm.execution_providers:
            cand.skipped, cand.error = True, "fp16 is for a GPU profile (CUDA)"
            return cand
        try:
            folder = self.folder(name)
            metrics: dict[str, Any] = {"model_bytes": folder_bytes(folder)}
            metrics.update(self.quality_of(name))
            self.progress(f"{profile.name}/{name}: TTFT, decode speed and peak RSS")
            t0 = time.perf_counter()
            threads = profile.llm_threads
            speed = probe(
                folder, threads, self.reference().prompt_ids[0], 32, self.cfg.eval.bench_runs
            )
            metrics.update(speed, threads=threads, execution_providers=["CPUExecutionProvider"])
            cand.steps = [*self._steps.get(name, []), _step("speed", t0, False)]
            cand.metrics = metrics
            cand.violations = violations(metrics, llm.budgets)
            cand.notes = {"genai_builder": {"precision": precision, "provider": provider, **extra}}
        except EdgefleetError as exc:
            cand.error = str(exc).splitlines()[0]
        return cand

    def build_profile(self, profile: DeviceProfile, out_dir: Path) -> ProfileResult:
        try:
            llm = effective_llm(profile, self.cfg)
        except EdgefleetError as exc:
            return ProfileResult(profile, [], None, None, error=str(exc))
        cands = [self.candidate(profile, llm, n) for n in llm.candidates]
        fitting = [c for c in cands if c.fits and not c.skipped]
        chosen = min(fitting, key=SELECT[llm.select]) if fitting else None
        result = ProfileResult(profile, cands, chosen, None)
        result.budgets = llm.budgets.model_dump()
        if chosen is not None:
            result.artifact = self.pack(profile, llm, chosen, cands, out_dir)
            chosen.artifact = result.artifact
            try:
                from builder.llm.report_html import write_llm_report

                result.report = write_llm_report(result, llm, result.artifact)
            except Exception as exc:  # the artifact stands without its HTML page
                log.warning("%s: HTML report not written: %s", result.artifact, exc)
        return result

    def pack(
        self,
        profile: DeviceProfile,
        llm: Llm,
        chosen: Candidate,
        cands: list[Candidate],
        out_dir: Path,
    ) -> Path:
        folder = self.folder(chosen.recipe)
        e = self.cfg.eval
        self.progress(f"{profile.name}/{chosen.recipe}: golden prompts and signing")
        golden = golden_prompts(folder, self.chats[: e.golden_prompts], e.golden_max_new_tokens)
        ensure_writable_dir(out_dir)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".llm-") as tmp:
            work = Path(tmp)
            report = {
                "recipe": chosen.recipe,
                "runtime": "onnxruntime-genai",
                "precision": chosen.precision,
                "metrics": chosen.metrics,
                "notes": chosen.notes,
                "steps": chosen.steps,
                "candidates": [c.summary() for c in cands],
            }
            files = {
                **convert.model_files(folder),
                "golden.json": write_json(work / "golden.json", golden.model_dump()),
                "report.json": write_json(work / "report.json", report),
            }
            manifest = self.manifest(profile, llm, chosen, golden, files)
            final = out_dir / manifest.artifact_name
            write_artifact(final, manifest, files, self.key)
        return final

    def manifest(
        self,
        profile: DeviceProfile,
        llm: Llm,
        chosen: Candidate,
        golden: GoldenPrompts,
        files: dict[str, Path],
    ) -> Manifest:
        precision, provider, extra = CANDIDATES[chosen.recipe]
        vocab = _vocab(self.folder(chosen.recipe))
        return Manifest(
            format_version=FORMAT_VERSION,
            name=self.cfg.name,
            version=self.cfg.version,
            profile=profile.name,
            runtime="onnxruntime-genai",
            precision=chosen.recipe,
            task="text-generation",
            created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            builder_version=__version__,
            model=ModelInfo(
                file="model",
                inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
                outputs=[
                    TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", vocab])
                ],
            ),
            files={k: file_entry(p) for k, p in files.items()},
            metrics=chosen.metrics,
            recipe=Recipe(
                name=chosen.recipe,
                steps=[
                    RecipeStep.model_validate({"pass": "gguf_to_hf", "config": {}}),
                    RecipeStep.model_validate(
                        {
                            "pass": "genai_build",
                            "config": {"precision": precision, "provider": provider, **extra},
                        }
                    ),
                ],
            ),
            golden=Golden(
                file="golden.json",
                count=len(golden.prompts),
                atol=0.0,
                rtol=0.0,
                prefix_tokens=self.cfg.eval.prefix_tokens,
            ),
            budgets=llm.budgets.model_dump(),
            security_floor=self.cfg.security_floor,
        )

    def close(self) -> None:
        """Nothing is held open between builds (folders stay in the cache)."""


def _vocab(folder: Path) -> int | str:
    import json

    try:
        doc = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        return int(doc["model"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return "vocab"


def _step(name: str, t0: float, cached: bool) -> dict[str, Any]:
    return {"pass": name, "seconds": round(time.perf_counter() - t0, 3), "cached": cached}


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
