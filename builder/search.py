"""Build every candidate recipe of a profile, gate each on the budgets, publish the best one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BudgetError, EdgefleetError
from agent.protocol.profile import DeviceProfile
from builder.candidate import Candidate, evaluate_and_pack
from builder.config import BuildConfig
from builder.data import DataBundle, check_labels, load_split
from builder.evaluate.accuracy import run_batched, torch_outputs
from builder.package import ensure_writable_dir
from builder.passes import ModelHandle, ModelKind, PassContext
from builder.pipeline import Pipeline, plan
from builder.recipes import NEEDS_STUDENT, TORCH_ONLY, recipe_steps
from builder.report_html import write_html_report

# Runtime that serves each kind of model file.
RUNTIME_OF = {ModelKind.ONNX: "onnxruntime", ModelKind.TFLITE: "litert"}

SELECT_KEYS: dict[str, Callable[[Candidate], Any]] = {
    "smallest": lambda c: (c.metrics["artifact_bytes"], c.metrics["latency_b1"]["p95_ms"]),
    "fastest": lambda c: (c.metrics["latency_b1"]["p95_ms"], c.metrics["artifact_bytes"]),
    "most_accurate": lambda c: (c.metrics.get("top1_drop_pt", 0.0), -c.metrics.get("cosine_min", 0.0)),
}


@dataclass
class ProfileResult:
    profile: DeviceProfile
    candidates: list[Candidate]
    chosen: Candidate | None
    artifact: Path | None
    report: Path | None = None  # the HTML compression report beside the artifact

    def summary(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "profile": self.profile.name, "runtime": self.profile.runtime.name,
            "chosen": c.recipe if c else None, "precision": c.precision if c else None,
            "artifact": str(self.artifact) if self.artifact else None,
            "report": str(self.report) if self.report else None,
            "metrics": c.metrics if c else None,
            "candidates": [x.summary() for x in self.candidates],
        }


class Builder:
    """Holds what all profiles share: data, the loaded model, the fp32 reference, the cache."""

    def __init__(self, cfg: BuildConfig, key: Any, cache_dir: Path, progress: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.key = key
        self.progress = progress or (lambda msg: None)
        self.cache_dir = cache_dir
        shape = tuple(cfg.model.input_shape)
        need_labels = cfg.task == "classification"
        ev = load_split(cfg.resolve(cfg.data.eval), "eval", shape, need_labels)
        cal = load_split(cfg.resolve(cfg.data.calibration), "calibration", shape, False) if cfg.data.calibration else ev
        tr = load_split(cfg.resolve(cfg.data.train), "train", shape, True) if cfg.data.train else None
        self.data = DataBundle(eval=ev, calibration=cal, train=tr)
        self.pipeline = Pipeline(cache_dir, self._ctx)
        # A distill step's student_factory file resolves against the build config's directory.
        self.custom_recipes = {
            k: [(s.name, {"base_dir": str(cfg.base_dir), **s.config} if s.name == "distill" else s.config) for s in v]
            for k, v in cfg.recipes.items()
        }
        self._source: ModelHandle | None = None
        self._reference: dict[str, np.ndarray] | None = None

    def _ctx(self, workdir: Path) -> PassContext:
        return PassContext(workdir=workdir, data=self.data, task=self.cfg.task, seed=self.cfg.seed, progress=self.progress)

    def _load_steps(self) -> list[tuple[str, dict[str, Any]]]:
        m = self.cfg.model
        raw: dict[str, Any] = {"input_shape": m.input_shape, "input_name": m.input_name,
                               "output_name": m.output_name, "base_dir": str(self.cfg.base_dir)}
        for k in ("factory", "weights", "pt2", "onnx"):
            v = getattr(m, k)
            if v:
                raw[k] = v if k == "factory" else str(self.cfg.resolve(v))
        return [("load", raw)]

    def source(self) -> ModelHandle:
        if self._source is None:
            self.progress("loading model")
            self._source = self.pipeline.run(None, plan(self._load_steps(), None, "load")).model
            self._reference = self._compute_reference(self._source)
            out = next(iter(self._reference.values()))
            if self.cfg.task == "classification":
                check_labels(self.data.eval, out.shape[-1])
        return self._source

    def _compute_reference(self, src: ModelHandle) -> dict[str, np.ndarray]:
        x = self.data.eval.x
        if src.kind == ModelKind.TORCH:
            return torch_outputs(src.module, x, src.output_names)
        from agent.runtime import load_session

        assert src.path is not None
        with load_session("onnxruntime", src.path) as s:
            return run_batched(s, src.input_name, x)

    def check(self, profiles: list[DeviceProfile]) -> list[str]:
        """Validate every recipe chain without running anything; returns the plans checked."""
        from_onnx = bool(self.cfg.model.onnx)
        kind = ModelKind.ONNX if from_onnx else ModelKind.TORCH
        checked = []
        for p in profiles:
            for r in p.build.candidates:
                if self._skip_reason(r, from_onnx):
                    continue
                plan(self._steps(r, p, from_onnx), kind, f"profile {p.name}, recipe {r}")
                checked.append(f"{p.name}/{r}")
        return checked

    def _skip_reason(self, recipe: str, from_onnx: bool) -> str | None:
        """Why a built-in recipe cannot apply to this model at all (None: it can)."""
        if recipe in self.custom_recipes:
            return None
        if from_onnx and recipe in TORCH_ONLY:
            return "needs a PyTorch model (input is ONNX)"
        if recipe in NEEDS_STUDENT and not self.cfg.distill:
            return "no [distill] table in the build config (which student to train)"
        return None

    def _steps(self, recipe: str, profile: DeviceProfile, from_onnx: bool) -> list[tuple[str, dict[str, Any]]]:
        steps = recipe_steps(recipe, profile, from_onnx, self.custom_recipes)
        if recipe in self.custom_recipes:
            return steps
        # Built-in distill steps take the student from the build config's [distill] table.
        base = {"base_dir": str(self.cfg.base_dir), **self.cfg.distill}
        return [(n, {**base, **c} if n == "distill" else c) for n, c in steps]

    def build_profile(self, profile: DeviceProfile, out_dir: Path) -> ProfileResult:
        ensure_writable_dir(out_dir)
        src = self.source()
        assert self._reference is not None
        from_onnx = src.kind == ModelKind.ONNX
        candidates: list[Candidate] = []
        stage = Path(tempfile.mkdtemp(prefix=f".stage-{profile.name}-", dir=self.cache_dir))
        try:
            planned = []
            for recipe in profile.build.candidates:
                cand = Candidate(recipe=recipe, profile=profile.name)
                candidates.append(cand)
                cand.error = self._skip_reason(recipe, from_onnx)
                cand.skipped = cand.error is not None
                if cand.error:
                    continue
                steps = self._steps(recipe, profile, from_onnx)
                chain = plan(steps, src.kind, f"profile {profile.name}, recipe {recipe}")
                kind = chain[-1].produces if chain else src.kind
                cand.runtime = RUNTIME_OF.get(kind, profile.runtime.name)
                planned.append((cand, steps, chain))
            # Candidates for the profile's own runtime come first; the others (e.g. ONNX on a
            # LiteRT device) are a fallback, built only when none of the first ones fits.
            primary = [x for x in planned if x[0].runtime == profile.runtime.name]
            fallback = [x for x in planned if x[0].runtime != profile.runtime.name]
            n = len(planned)
            for i, (cand, steps, chain) in enumerate(primary + fallback):
                if i == len(primary) and any(c.fits for c, _, _ in primary):
                    for c, _, _ in fallback:
                        c.skipped = True
                        c.error = f"not built: a {profile.runtime.name} candidate fits ({c.runtime} is the fallback)"
                    break
                self.progress(f"{profile.name}: candidate {i + 1}/{n} {cand.recipe}")
                self._build_one(cand, profile, steps, chain, src, stage)
            fitting = [c for c in candidates if c.fits and c.runtime == profile.runtime.name]
            fitting = fitting or [c for c in candidates if c.fits]
            if not fitting:
                return ProfileResult(profile, candidates, None, None)
            chosen = min(fitting, key=SELECT_KEYS[profile.build.select])
            assert chosen.artifact is not None
            final = out_dir / chosen.artifact.name
            tmp = out_dir / f".{chosen.artifact.name}.part"
            shutil.copyfile(chosen.artifact, tmp)
            os.replace(tmp, final)
            result = ProfileResult(profile, candidates, chosen, final)
            result.report = write_html_report(result, final)
            return result
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _build_one(self, cand: Candidate, profile: DeviceProfile, steps: list[tuple[str, dict[str, Any]]],
                   chain: list[Any], src: ModelHandle, stage: Path) -> None:
        assert self._reference is not None
        try:
            run = self.pipeline.run(src, chain)
            cand.steps = [{"pass": s.name, "seconds": s.seconds, "cached": s.cached} for s in run.steps]
            self.progress(f"{profile.name}: measuring {cand.recipe}")
            evaluate_and_pack(
                cand, run.model, profile, name=self.cfg.name, version=self.cfg.version,
                task=self.cfg.task, eval_x=self.data.eval.x, eval_y=self.data.eval.y,
                reference=self._reference, golden_count=self.cfg.golden_count,
                recipe_steps=steps, key=self.key, workdir=stage / cand.recipe,
            )
        except EdgefleetError as exc:
            # One failing recipe does not stop the others; the table says why.
            cand.error = str(exc)


def no_fit_error(result: ProfileResult) -> BudgetError:
    """The error for a profile where nothing fits, saying how far each candidate was."""
    return BudgetError(f"profile '{result.profile.name}': no candidate meets the budgets: " + "; ".join(
        f"{c.recipe}: {c.error or ', '.join(c.violations)}" for c in result.candidates
    ))
