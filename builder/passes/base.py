"""One shape for every pass: a config schema, what it accepts, what it produces, and ``run``.

Passes never import heavy dependencies at module level beyond what they need; the registry
(builder.passes.__init__) imports a pass's module only when a recipe uses it.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from agent.runtime.base import IOSpec

if TYPE_CHECKING:
    from builder.data import DataBundle


class ModelKind(str, Enum):
    TORCH = "torch"
    ONNX = "onnx"
    TFLITE = "tflite"


@dataclass
class ModelHandle:
    """A model between passes: an in-memory torch module or a model file on disk."""

    kind: ModelKind
    # Digest of the model's content; the pipeline cache keys on it.
    digest: str
    module: Any = None  # torch.nn.Module when kind is TORCH
    path: Path | None = None  # model file when kind is ONNX/TFLITE
    # Every input in the order a torch module takes them; shapes with named dynamic dims.
    inputs: tuple[IOSpec, ...] = ()
    output_names: tuple[str, ...] = ("output",)
    # Batch axis of each input/output that does not have it at 0 (None: no batch axis).
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    precision: str = "fp32"
    # Facts passes record for the report (sparsity, params, per-layer ranks, ...).
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    def batch_axis(self, name: str) -> int | None:
        return self.batch_axes.get(name, 0)

    def with_module(self, module: Any, notes: dict[str, Any]) -> ModelHandle:
        """The same interface as this model, now as torch ``module``; ``notes`` are added."""
        return replace(
            self,
            kind=ModelKind.TORCH,
            module=module,
            path=None,
            digest=digest_module(module),
            notes={**self.notes, **notes},
        )

    def with_file(
        self, path: Path, notes: dict[str, Any], precision: str | None = None
    ) -> ModelHandle:
        """The same interface as this model, now as the model file ``path``; ``notes`` are added."""
        kind = ModelKind.TFLITE if path.suffix == ".tflite" else ModelKind.ONNX
        return replace(
            self,
            kind=kind,
            module=None,
            path=path,
            digest=digest_file(path),
            precision=precision or self.precision,
            notes={**self.notes, **notes},
        )


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassContext:
    workdir: Path
    data: DataBundle
    task: str = "classification"
    threads: int = 1
    seed: int = 0
    # Called with a short line of progress; the CLI wires it to its progress display.
    progress: Any = None

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)


class Pass(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]
    accepts: ClassVar[tuple[ModelKind, ...]]

    @abstractmethod
    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        """Kind of model this pass outputs, known before running (used to check a chain)."""

    @abstractmethod
    def run(
        self, model: ModelHandle | None, config: PassConfig, ctx: PassContext
    ) -> ModelHandle: ...


def digest_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_module(module: Any) -> str:
    """Content digest of a torch module: architecture text plus every tensor's bytes."""
    h = hashlib.sha256(repr(module).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
