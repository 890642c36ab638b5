"""LiteRT (TFLite) adapter: ai-edge-litert, falling back to tflite-runtime where installed.

Int8 input/output tensors are quantized/dequantized with the tensor's own scale and zero point,
so callers always exchange float32.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import DependencyError, ModelError
from agent.runtime.base import InferenceSession, IOSpec


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        return None


def is_available() -> bool:
    return _interpreter_class() is not None


def _spec(d: dict[str, Any]) -> IOSpec:
    shape = tuple(int(x) for x in d["shape_signature"]) if "shape_signature" in d else tuple(d["shape"])
    shape = tuple("batch" if (i == 0 and s == -1) else s for i, s in enumerate(shape))
    return IOSpec(d["name"], np.dtype(d["dtype"]).name, shape)


class LiteRtSession(InferenceSession):
    def __init__(self, path: Path, threads: int) -> None:
        cls = _interpreter_class()
        if cls is None:
            raise DependencyError("LiteRT is not installed: pip install 'edgefleet[tflite]'")
        try:
            self._interp = cls(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:
            raise ModelError(f"{path}: LiteRT cannot load the model: {exc}") from None
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self._batch: int | None = None
        # An interpreter is not thread-safe; the endpoint's threads and the agent's probation share it.
        self._lock = threading.Lock()

    @property
    def inputs(self) -> list[IOSpec]:
        return [_spec(d) for d in self._in]

    @property
    def outputs(self) -> list[IOSpec]:
        return [_spec(d) for d in self._out]

    def infer(self, feeds: dict[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        with self._lock:
            return self._infer(feeds)

    def _infer(self, feeds: dict[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        first = next(iter(feeds.values()))
        if first.shape[0] != self._batch:
            for d in self._in:
                shape = list(d["shape"])
                shape[0] = first.shape[0]
                self._interp.resize_tensor_input(d["index"], shape)
            self._interp.allocate_tensors()
            self._in = self._interp.get_input_details()
            self._out = self._interp.get_output_details()
            self._batch = first.shape[0]
        for d in self._in:
            x = np.asarray(feeds[d["name"]])
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]) in (np.int8, np.uint8) and scale:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale + zp), info.min, info.max).astype(d["dtype"])
            self._interp.set_tensor(d["index"], x.astype(d["dtype"], copy=False))
        self._interp.invoke()
        result: dict[str, npt.NDArray[np.generic]] = {}
        for d in self._out:
            y = self._interp.get_tensor(d["index"])
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]) in (np.int8, np.uint8) and scale:
                y = (y.astype(np.float32) - zp) * scale
            result[d["name"]] = y
        return result


def load(path: Path, threads: int = 1, providers: tuple[str, ...] = ()) -> LiteRtSession:
    return LiteRtSession(path, threads)
