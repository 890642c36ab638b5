"""Build every candidate recipe of a profile, gate each on the budgets, publish the best one."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError, ModelError
from agent.protocol.profile import DeviceProfile
from agent.runtime.base import IOSpec
from builder.candidate import Candidate, Reference, evaluate_and_pack
from builder.compression_report_html import write_html_report
from builder.config import BuildConfig, effective_profile
from builder.data import DataBundle, check_labels, check_split, read_npz
from builder.evaluate.accuracy import run_batched
from builder.package import ensure_writable_dir
from builder.passes import ModelHandle, ModelKind, PassContext
from builder.pipeline import Pipeline, plan
from builder.profile_result import ProfileResult
from builder.recipes import EXPORT, NEEDS_STUDENT, SIMPLIFY, TORCH_ONLY, recipe_steps

log = logging.getLogger(__name__)

# Runtime that serves each kind of model file.
RUNTIME_OF = {ModelKind.ONNX: "onnxruntime", ModelKind.TFLITE: "litert"}

# Selection compares the model file's bytes (an artifact's tar padding and golden vectors
# would make an fp32 and an int8 model of a few KB the same size).
SELECT_KEYS: dict[str, Callable[[Candidate], Any]] = {
    "smallest": lambda c: (c.metrics["model_bytes"], c.metrics["latency_b1"]["p95_ms"]),
    "fastest": lambda c: (c.metrics["latency_b1"]["p95_ms"], c.metrics["model_bytes"]),
    "most_accurate": lambda c: (
        c.metrics.get("top1_drop_pt", 0.0),
        c.metrics.get("metric_drop", 0.0),
        -c.metrics.get("cosine_min", 0.0),
    ),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Builder:
    """Holds what all profiles share: data, the loaded model, the fp32 reference, the cache."""

    def __init__(
        self,
        cfg: BuildConfig,
        key: Any,
        cache_dir: Path,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.key = key
        self.progress = progress or (lambda msg: None)
        self.cache_dir = cache_dir
        m = cfg.model
        ev_path = cfg.resolve(cfg.data.eval)
        ev_raw = read_npz(ev_path, "eval")
        self.specs = self._input_specs(ev_raw)
        names = [s.name for s in self.specs]
        self.batch_axes = {k: m.batch_axis(k) for k in {*names, *m.batch_axes}}
        need_labels = cfg.task == "classification" and cfg.metric is None

        def load(rel: str, role: str, labels: bool) -> Any:
            path = cfg.resolve(rel)
            raw = ev_raw if path == ev_path else read_npz(path, role)
            return check_split(raw, path, role, self.specs, self.batch_axes, cfg.task, labels)

        ev = load(cfg.data.eval, "eval", need_labels)
        cal = load(cfg.data.calibration, "calibration", False) if cfg.data.calibration else ev
        tr = load(cfg.data.train, "train", False) if cfg.data.train else None
        self.data = DataBundle(eval=ev, calibration=cal, train=tr)
        self.pipeline = Pipeline(cache_dir, self._ctx)
        # A distill step's student_factory file resolves against the build config's directory.
        self.custom_recipes = {
            k: [
                (
                    s.name,
                    {"base_dir": str(cfg.base_dir), **s.config}
                    if s.name == "distill"
                    else s.config,
                )
                for s in v
            ]
            for k, v in cfg.recipes.items()
        }
        self.metric = None
        if cfg.metric:
            from builder.passes.load import resolve_factory

            self.metric = resolve_factory(cfg.metric, cfg.base_dir)
        self._source: ModelHandle | None = None
        self._reference: Reference | None = None

    def _input_specs(self, eval_arrays: dict[str, Any]) -> list[IOSpec]:
        """The model's inputs: declared by an ONNX file, else from the config and the eval data."""
        m = self.cfg.model
        if m.onnx:
            from builder.passes.load import onnx_io

            return onnx_io(self.cfg.resolve(m.onnx))[0]
        if m.input_shape is not None:  # the one-input form: a float32 (batch, *input_shape)
            return [IOSpec(m.input_name, "float32", ("batch", *m.input_shape))]
        names = list(m.inputs or [k for k in eval_arrays if k != "y"])
        specs = []
        for n in names:
            arr = eval_arrays.get(n)
            if arr is None:
                from agent.errors import DataError

                found = ", ".join(k for k in eval_arrays if k != "y") or "none"
                raise DataError(
                    f"eval data {self.cfg.data.eval}: no array for model input {n} (found: {found})"
                )
            dims: list[int | str] = list(arr.shape[1:])
            ax = m.batch_axis(n)
            if ax is not None:
                dims.insert(ax, "batch")
            for axis, label in m.dynamic_axes.get(n, {}).items():
                if axis >= len(dims):
                    from agent.errors import ConfigError

                    raise ConfigError(
                        f"model.dynamic_axes.{n}: axis {axis} is beyond the input's rank {len(dims)}"
                    )
                dims[axis] = label
            specs.append(IOSpec(n, str(arr.dtype), tuple(dims)))
        return specs

    def _ctx(self, workdir: Path) -> PassContext:
        return PassContext(
            workdir=workdir,
            data=self.data,
            task=self.cfg.task,
            seed=self.cfg.seed,
            progress=self.progress,
        )

    def _load_steps(self) -> list[tuple[str, dict[str, Any]]]:
        m = self.cfg.model
        raw: dict[str, Any] = {
            "inputs": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.specs
            ],
            "output_names": list(m.output_names),
            "batch_axes": self.batch_axes,
            "base_dir": str(self.cfg.base_dir),
        }
        for k in ("factory", "weights", "pt2", "onnx"):
            v = getattr(m, k)
            if v:
                raw[k] = v if k == "factory" else str(self.cfg.resolve(v))
        return [("load", raw)]

    def load_model(self) -> ModelHandle:
        """Import and load the model, and run it once on real eval samples (no reference yet)."""
        if self._source is None:
            self.progress("loading model")
            self._source = self.pipeline.run(None, plan(self._load_steps(), None, "load")).model
        return self._source

    def source(self) -> ModelHandle:
        src = self.load_model()
        if self._reference is None:
            self.progress("computing the fp32 reference outputs")
            self._reference = self._compute_reference(src)
        return src

    def _compute_reference(self, src: ModelHandle) -> Reference:
        ev = self.data.eval
        if src.kind == ModelKind.TORCH:
            from builder.torchio import torch_outputs

            outputs = torch_outputs(
                src.module, ev, src.input_names, src.output_names, src.batch_axes
            )
        else:
            from agent.runtime import load_session

            assert src.path is not None
            with load_session("onnxruntime", src.path) as s:
                outputs = run_batched(s, ev, src.batch_axes)
        if self.cfg.task == "classification":
            check_labels(ev, next(iter(outputs.values())).shape[-1])
        ref = Reference(outputs=outputs, task=self.cfg.task, metric=self.metric)
        if self.metric is not None:
            try:
                ref.metric_value = float(self.metric(outputs, outputs, ev.y))
            except Exception as exc:
                raise ModelError(
                    f"metric '{self.cfg.metric}' failed on the fp32 outputs: "
                    f"{type(exc).__name__}: {_first_line(exc)}"
                ) from None
        return ref

    def _latency_reference(self, src: ModelHandle) -> Path | None:
        """The fp32 ONNX every candidate is timed beside (None if it cannot be made)."""
        if src.kind == ModelKind.ONNX:
            return src.path
        try:
            run = self.pipeline.run(src, plan([EXPORT, SIMPLIFY], src.kind, "fp32 reference"))
        except Exception as exc:
            log.info("no fp32 ONNX reference for latency: %s", exc)
            return None
        return run.model.path

    def check(self, profiles: list[DeviceProfile]) -> list[str]:
        """Validate every recipe chain, import and run the model on the data; build nothing."""
        from_onnx = bool(self.cfg.model.onnx)
        kind = ModelKind.ONNX if from_onnx else ModelKind.TORCH
        checked = []
        for p in profiles:
            p = effective_profile(p, self.cfg)
            for r in p.build.candidates:
                if self._skip_reason(r, from_onnx):
                    continue
                plan(self._steps(r, p, from_onnx), kind, f"profile {p.name}, recipe {r}")
                checked.append(f"{p.name}/{r}")
        self.load_model()
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

    def _steps(
        self, recipe: str, profile: DeviceProfile, from_onnx: bool
    ) -> list[tuple[str, dict[str, Any]]]:
        steps = recipe_steps(recipe, profile, from_onnx, self.custom_recipes)
        if recipe in self.custom_recipes:
            return steps
        # Built-in distill steps take the student from the build config's [distill] table.
        base = {"base_dir": str(self.cfg.base_dir), **self.cfg.distill}
        return [(n, {**base, **c} if n == "distill" else c) for n, c in steps]

    def build_profile(self, profile: DeviceProfile, out_dir: Path) -> ProfileResult:
        """Build every candidate of ``profile``; any failure is a candidate's (or the profile's)
        reason in the result, never an exception out of here."""
        try:
            profile = effective_profile(profile, self.cfg)
            ensure_writable_dir(out_dir)
            src = self.source()
        except Exception as exc:
            if not isinstance(exc, EdgefleetError):
                log.debug("profile %s failed", profile.name, exc_info=True)
            return ProfileResult(
                profile,
                [],
                None,
                None,
                error=_first_line(exc)
                if isinstance(exc, EdgefleetError)
                else f"{type(exc).__name__}: {_first_line(exc)}",
            )
        assert self._reference is not None
        if self._reference.latency_model is None:
            self._reference.latency_model = self._latency_reference(src)
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
                try:
                    steps = self._steps(recipe, profile, from_onnx)
                    chain = plan(steps, src.kind, f"profile {profile.name}, recipe {recipe}")
                except EdgefleetError as exc:
                    cand.error = str(exc)
                    continue
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
            try:
                result.report = write_html_report(result, final)
            except Exception as exc:  # the artifact stands without its HTML page
                log.warning("%s: HTML report not written: %s", final, exc)
            return result
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _build_one(
        self,
        cand: Candidate,
        profile: DeviceProfile,
        steps: list[tuple[str, dict[str, Any]]],
        chain: list[Any],
        src: ModelHandle,
        stage: Path,
    ) -> None:
        assert self._reference is not None
        try:
            run = self.pipeline.run(src, chain)
            cand.steps = [
                {"pass": s.name, "seconds": s.seconds, "cached": s.cached} for s in run.steps
            ]
            self.progress(f"{profile.name}: measuring {cand.recipe}")
            evaluate_and_pack(
                cand,
                run.model,
                profile,
                name=self.cfg.name,
                version=self.cfg.version,
                task=self.cfg.task,
                data=self.data.eval,
                ref=self._reference,
                golden_wanted=self.cfg.golden_count,
                recipe_steps=steps,
                key=self.key,
                workdir=stage / cand.recipe,
                security_floor=self.cfg.security_floor,
            )
        except EdgefleetError as exc:
            # One failing recipe does not stop the others; the table says why.
            cand.error = str(exc)
        except (
            Exception
        ) as exc:  # a converter's or runtime's own error: still this candidate's alone
            log.debug("candidate %s/%s failed", profile.name, cand.recipe, exc_info=True)
            cand.error = f"{type(exc).__name__}: {_first_line(exc)}"
        if cand.error:
            cand.violations = []
