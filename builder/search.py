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
from builder.recipes import TORCH_ONLY, recipe_steps

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

    def summary(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "profile": self.profile.name, "runtime": self.profile.runtime.name,
            "chosen": c.recipe if c else None, "precision": c.precision if c else None,
            "artifact": str(self.artifact) if self.artifact else None,
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
                if from_onnx and r in TORCH_ONLY and r not in self.custom_recipes:
                    continue
                plan(recipe_steps(r, p, from_onnx, self.custom_recipes), kind, f"profile {p.name}, recipe {r}")
                checked.append(f"{p.name}/{r}")
        return checked

    def build_profile(self, profile: DeviceProfile, out_dir: Path) -> ProfileResult:
        ensure_writable_dir(out_dir)
        src = self.source()
        assert self._reference is not None
        from_onnx = src.kind == ModelKind.ONNX
        candidates: list[Candidate] = []
        stage = Path(tempfile.mkdtemp(prefix=f".stage-{profile.name}-", dir=self.cache_dir))
        try:
            for i, recipe in enumerate(profile.build.candidates):
                cand = Candidate(recipe=recipe, profile=profile.name)
                candidates.append(cand)
                if from_onnx and recipe in TORCH_ONLY and recipe not in self.custom_recipes:
                    cand.error = "needs a PyTorch model (input is ONNX)"
                    continue
                self.progress(f"{profile.name}: candidate {i + 1}/{len(profile.build.candidates)} {recipe}")
                steps = recipe_steps(recipe, profile, from_onnx, self.custom_recipes)
                try:
                    run = self.pipeline.run(src, plan(steps, src.kind, f"profile {profile.name}, recipe {recipe}"))
                    cand.steps = [{"pass": s.name, "seconds": s.seconds, "cached": s.cached} for s in run.steps]
                    self.progress(f"{profile.name}: measuring {recipe}")
                    evaluate_and_pack(
                        cand, run.model, profile, name=self.cfg.name, version=self.cfg.version,
                        task=self.cfg.task, eval_x=self.data.eval.x, eval_y=self.data.eval.y,
                        reference=self._reference, golden_count=self.cfg.golden_count,
                        recipe_steps=steps, key=self.key, workdir=stage / recipe,
                    )
                except EdgefleetError as exc:
                    # One failing recipe does not stop the others; the table says why.
                    cand.error = str(exc)
            fitting = [c for c in candidates if c.fits]
            if not fitting:
                return ProfileResult(profile, candidates, None, None)
            chosen = min(fitting, key=SELECT_KEYS[profile.build.select])
            assert chosen.artifact is not None
            final = out_dir / chosen.artifact.name
            tmp = out_dir / f".{chosen.artifact.name}.part"
            shutil.copyfile(chosen.artifact, tmp)
            os.replace(tmp, final)
            return ProfileResult(profile, candidates, chosen, final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def no_fit_error(result: ProfileResult) -> BudgetError:
    """The error for a profile where nothing fits, saying how far each candidate was."""
    return BudgetError(f"profile '{result.profile.name}': no candidate meets the budgets: " + "; ".join(
        f"{c.recipe}: {c.error or ', '.join(c.violations)}" for c in result.candidates
    ))
