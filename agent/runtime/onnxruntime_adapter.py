"""onnxruntime adapter. Picks the first available execution provider the profile names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError, RuntimeTooOldError, missing_dependency
from agent.runtime.base import InferenceSession, IOSpec
from agent.runtime.onnx_versions import too_new

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def is_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _spec(arg: Any) -> IOSpec:
    shape = tuple(d if isinstance(d, int) else str(d or "?") for d in arg.shape)
    return IOSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)


def _load_error(path: Path, version: str, exc: Exception) -> ModelError:
    """A model newer than this onnxruntime gets a one-line reason naming both versions."""
    reason = too_new(path, version, str(exc))
    if reason is not None:
        return RuntimeTooOldError(reason)
    return ModelError(f"{path}: onnxruntime cannot load the model: {exc}")


class OrtSession(InferenceSession):
    def __init__(self, path: Path, threads: int, providers: tuple[str, ...]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_dependency(
                "onnxruntime",
                "agent,onnxruntime",
                "the ONNX Runtime adapter",
                alternative="NVIDIA's onnxruntime-gpu on a Jetson",
            ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        have = set(ort.get_available_providers())
        chosen = [p for p in providers if p in have] or ["CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            # get_available_providers() lists EPs compiled in, not loadable ones (TensorRT
            # without libnvinfer): if onnxruntime's own one-shot fallback did not catch it,
            # retry on the CPU once.
            if chosen == ["CPUExecutionProvider"]:
                raise _load_error(path, ort.__version__, exc) from None
            log.warning(
                "%s: providers %s failed (%s); retrying on CPUExecutionProvider", path, chosen, exc
            )
            try:
                self._sess = ort.InferenceSession(
                    str(path), sess_options=opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc2:
                raise _load_error(path, ort.__version__, exc2) from None
        self.providers: list[str] = list(self._sess.get_providers())
        if self.providers[:1] != chosen[:1]:
            log.warning("%s: asked for %s, running on %s", path, chosen, self.providers)
        log.info(
            "%s: onnxruntime session providers %s (profile asked for %s)",
            path,
            self.providers,
            list(providers),
        )
        self._inputs = [_spec(a) for a in self._sess.get_inputs()]
        self._outputs = [_spec(a) for a in self._sess.get_outputs()]
        self._out_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> list[IOSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[IOSpec]:
        return self._outputs

    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        # run returns one array per name asked for, in order (no strict zip on the hot path)
        return dict(zip(self._out_names, self._sess.run(self._out_names, feeds)))  # noqa: B905


def load(
    path: Path, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> OrtSession:
    return OrtSession(path, threads, providers)
