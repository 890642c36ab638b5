"""Calibration, evaluation and training data: .npz files with an ``x`` array and optional ``y``.

Everything is checked against the model's input shape before any pass runs, so a wrong
shape or dtype is one clear line instead of an exception deep inside a quantizer.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.errors import DataError

F32 = npt.NDArray[np.float32]


@dataclass
class Split:
    x: F32
    y: npt.NDArray[np.int64] | None
    source: str


@dataclass
class DataBundle:
    eval: Split
    calibration: Split
    train: Split | None = None


def load_split(path: Path, role: str, input_shape: tuple[int, ...], need_labels: bool) -> Split:
    """Load ``path`` and check it fits a model taking (batch, *input_shape) float32."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{role} data {path}: file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{role} data {path}: not a readable .npz file ({exc})") from None
    if "x" not in arrays:
        raise DataError(f"{role} data {path}: no array named 'x' (found: {', '.join(arrays) or 'none'})")
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{role} data {path}: x has dtype {x.dtype}, expected a float dtype (float32)")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"{role} data {path}: x has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, input_shape))})"
        )
    if x.shape[0] == 0:
        raise DataError(f"{role} data {path}: x holds no samples")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{role} data {path}: x contains NaN or infinite values")
    y = arrays.get("y")
    if y is None:
        if need_labels:
            raise DataError(f"{role} data {path}: a classifier needs labels, but there is no array named 'y'")
        return Split(x.astype(np.float32), None, str(path))
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{role} data {path}: y has dtype {y.dtype}, expected integer class labels")
    if y.shape != (x.shape[0],):
        raise DataError(f"{role} data {path}: y has shape {tuple(y.shape)}, expected ({x.shape[0]},) to match x")
    if y.min() < 0:
        raise DataError(f"{role} data {path}: y holds negative labels")
    return Split(x.astype(np.float32), y.astype(np.int64), str(path))


def check_labels(split: Split, num_classes: int) -> None:
    if split.y is not None and int(split.y.max()) >= num_classes:
        raise DataError(
            f"{split.source}: label {int(split.y.max())} is out of range for a model with {num_classes} outputs"
        )
