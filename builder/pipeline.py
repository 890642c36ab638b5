"""Run a chain of passes: check it before running, time each pass, cache results.

The cache key of a step is (digest of its input model, pass name, canonical config). File
outputs (ONNX/TFLite) are kept on disk in the cache directory, so candidates that share a
prefix (export -> simplify) and repeated builds reuse the work; torch outputs are cached in
memory for the life of the process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.errors import ConfigError
from agent.protocol.validation import format_validation_error
from agent.runtime.base import IOSpec
from builder.passes import ModelHandle, ModelKind, Pass, PassConfig, PassContext, get_pass
from builder.passes.base import Timer, digest_bytes

# Bumped when handle.json changes, so an older cache entry is never read as a newer one.
CACHE_FORMAT = "2"


@dataclass
class StepResult:
    name: str
    config: dict[str, Any]
    seconds: float
    cached: bool


@dataclass
class PlannedStep:
    name: str
    impl: Pass
    config: PassConfig
    raw_config: dict[str, Any]
    produces: ModelKind  # the kind of model this step outputs (known once planned)


@dataclass
class PipelineRun:
    model: ModelHandle
    steps: list[StepResult] = field(default_factory=list)


def plan(
    steps: list[tuple[str, dict[str, Any]]], input_kind: ModelKind | None, where: str
) -> list[PlannedStep]:
    """Resolve passes and configs and check that each accepts what the previous produces."""
    planned = []
    kind = input_kind
    for i, (name, raw) in enumerate(steps):
        impl = get_pass(name)
        try:
            cfg = impl.config_class.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(f"{where}: step {i + 1} ({name})", exc)
            ) from None
        if impl.accepts and kind not in impl.accepts:
            raise ConfigError(
                f"{where}: step {i + 1} ({name}) accepts {'/'.join(k.value for k in impl.accepts)} "
                f"models but gets {kind.value if kind else 'nothing'}"
            )
        kind = impl.produces(cfg, kind)
        planned.append(PlannedStep(name, impl, cfg, raw, kind))
    return planned


class Pipeline:
    def __init__(self, cache_dir: Path, ctx_factory: Any) -> None:
        self.cache_dir = cache_dir
        self._ctx_factory = ctx_factory  # (workdir) -> PassContext
        self._memory: dict[str, ModelHandle] = {}

    def _key(self, model: ModelHandle | None, step: PlannedStep) -> str:
        cfg = json.dumps(step.config.model_dump(mode="json"), sort_keys=True)
        return digest_bytes(CACHE_FORMAT, model.digest if model else "source", step.name, cfg)[:32]

    def run(self, model: ModelHandle | None, steps: list[PlannedStep]) -> PipelineRun:
        result = PipelineRun(model=model)  # type: ignore[arg-type]
        for step in steps:
            key = self._key(model, step)
            cached = self._lookup(key)
            if cached is not None:
                model = cached
                result.steps.append(StepResult(step.name, step.raw_config, 0.0, True))
                continue
            workdir = self.cache_dir / f"{key}.tmp"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            ctx: PassContext = self._ctx_factory(workdir)
            try:
                with Timer() as t:
                    model = step.impl.run(model, step.config, ctx)
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
            model = self._store(key, model, workdir)
            result.steps.append(StepResult(step.name, step.raw_config, round(t.seconds, 3), False))
        assert model is not None
        result.model = model
        return result

    def _lookup(self, key: str) -> ModelHandle | None:
        if key in self._memory:
            return self._memory[key]
        meta = self.cache_dir / key / "handle.json"
        if meta.is_file():
            doc = json.loads(meta.read_text())
            handle = ModelHandle(
                kind=ModelKind(doc["kind"]),
                digest=doc["digest"],
                path=self.cache_dir / key / doc["file"],
                inputs=tuple(
                    IOSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in doc["inputs"]
                ),
                output_names=tuple(doc["output_names"]),
                batch_axes=doc["batch_axes"],
                precision=doc["precision"],
                notes=doc["notes"],
            )
            self._memory[key] = handle
            return handle
        return None

    def _store(self, key: str, model: ModelHandle, workdir: Path) -> ModelHandle:
        # Torch modules, and files the pass did not write (load of a user's .onnx), stay in memory.
        if model.kind == ModelKind.TORCH or model.path is None or model.path.parent != workdir:
            shutil.rmtree(workdir, ignore_errors=True)
            self._memory[key] = model
            return model
        final = self.cache_dir / key
        shutil.rmtree(final, ignore_errors=True)
        # Keep only the model file: intermediate files of the pass are not needed later.
        for p in workdir.iterdir():
            if p != model.path:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        doc = {
            "kind": model.kind.value,
            "digest": model.digest,
            "file": model.path.name,
            "inputs": [
                {"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in model.inputs
            ],
            "output_names": list(model.output_names),
            "batch_axes": model.batch_axes,
            "precision": model.precision,
            "notes": model.notes,
        }
        (workdir / "handle.json").write_text(json.dumps(doc, default=str))
        workdir.rename(final)  # atomic: a crash never leaves a half-written cache entry
        model.path = final / model.path.name
        self._memory[key] = model
        return model
