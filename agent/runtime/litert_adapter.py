"""LiteRT (TFLite) adapter: ai-edge-litert, falling back to tflite-runtime where installed.

An int8/uint8 tensor with a quantization scale faces float32 callers: float inputs are quantized
and outputs dequantized with the tensor's own scale and zero point (an input already given as
integers is passed as it is). Every other tensor (int32/int64 ids, bool masks, int8 without a
scale, float16) is exchanged in its own dtype. Each input is resized to its feed's shape when that
changes, whichever axes are dynamic.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError, missing_dependency
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


def _quantized(d: dict[str, Any]) -> bool:
    return np.dtype(d["dtype"]) in (np.int8, np.uint8) and bool(d["quantization"][0])


def _spec(d: dict[str, Any]) -> IOSpec:
    sig = d.get("shape_signature")
    shape: tuple[int | str, ...] = tuple(int(x) for x in (sig if sig is not None else d["shape"]))
    shape = tuple(("batch" if i == 0 else f"d{i}") if s == -1 else s for i, s in enumerate(shape))
    return IOSpec(d["name"], np.dtype(d["dtype"]).name, shape, _quantized(d))


class LiteRtSession(InferenceSession):
    def __init__(self, path: Path, threads: int) -> None:
        cls = _interpreter_class()
        if cls is None:
            raise missing_dependency("ai-edge-litert", "agent,litert", "the LiteRT runtime")
        try:
            self._interp = cls(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:
            raise ModelError(f"{path}: LiteRT cannot load the model: {exc}") from None
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        # An interpreter is not thread-safe; the endpoint's threads and the agent's probation share it.
        self._lock = threading.Lock()

    @property
    def inputs(self) -> list[IOSpec]:
        return [_spec(d) for d in self._in]

    @property
    def outputs(self) -> list[IOSpec]:
        return [_spec(d) for d in self._out]

    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        with self._lock:
            return self._infer(feeds)

    def _infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        arrays = {d["name"]: np.asarray(feeds[d["name"]]) for d in self._in}
        resized = False
        for d in self._in:
            shape = arrays[d["name"]].shape
            if tuple(d["shape"]) != shape:
                self._interp.resize_tensor_input(d["index"], list(shape))
                resized = True
        if resized:
            self._interp.allocate_tensors()
            self._in = self._interp.get_input_details()
            self._out = self._interp.get_output_details()
        for d in self._in:
            x = arrays[d["name"]]
            dtype = np.dtype(d["dtype"])
            if _quantized(d) and x.dtype.kind == "f":
                scale, zp = d["quantization"]
                info = np.iinfo(dtype)
                x = np.clip(np.round(x / scale + zp), info.min, info.max)
            self._interp.set_tensor(d["index"], x.astype(dtype, copy=False))
        self._interp.invoke()
        result: dict[str, npt.NDArray[np.generic]] = {}
        for d in self._out:
            y = self._interp.get_tensor(d["index"])
            if _quantized(d):
                scale, zp = d["quantization"]
                y = (y.astype(np.float32) - zp) * np.float32(scale)
            result[d["name"]] = y
        return result


def load(path: Path, threads: int = 1, providers: tuple[str, ...] = ()) -> LiteRtSession:
    return LiteRtSession(path, threads)
