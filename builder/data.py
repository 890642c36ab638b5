"""Calibration, evaluation and training data: .npz files with one array per model input.

A model has any number of named inputs of any dtype the runtimes take. The build data holds
one array per input name, samples along axis 0 (``input_ids`` int64 (N, 64), ``state``
float32 (N, 2, 128), ``sr`` int64 (N,)), plus labels ``y`` (classifiers: int) or targets
(regression: float). A file with a single array ``x`` keeps working for a one-input model.

Where a sample goes in a feed is the input's *batch axis*: 0 for most inputs, 1 for a
recurrent state shaped (layers, batch, hidden), None for an input that has no batch
(a scalar such as a sample rate); a model with such an input is run one sample at a time.

Everything is checked against the model's inputs before any pass runs, so a wrong name,
shape or dtype is one clear line instead of an exception deep inside a quantizer.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import DataError
from agent.runtime.base import IOSpec

Feeds = dict[str, npt.NDArray[Any]]
LABELS = "y"
# dtype kinds each model dtype accepts from the data (values are cast to the model's dtype).
_KIND = {"f": "float", "i": "integer", "u": "integer", "b": "bool"}


def dtype_kind(dtype: str | np.dtype[Any]) -> str:
    return _KIND.get(np.dtype(dtype).kind, str(dtype))


@dataclass
class Split:
    """One data set: an array per input (samples on axis 0) and optional labels/targets."""

    inputs: dict[str, npt.NDArray[Any]]
    y: npt.NDArray[Any] | None
    source: str
    batch_axes: dict[str, int | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def batchable(self) -> bool:
        """False when an input has no batch axis: the model then runs one sample at a time."""
        return all(self.batch_axes.get(k, 0) is not None for k in self.inputs)

    def feeds(self, start: int, stop: int) -> Feeds:
        """The runtime feed for samples [start, stop): each array with its batch axis in place."""
        out: Feeds = {}
        for name, arr in self.inputs.items():
            part = arr[start:stop]
            ax = self.batch_axes.get(name, 0)
            if ax is None:
                if len(part) != 1:
                    raise ValueError(f"input {name} has no batch axis: feed one sample at a time")
                out[name] = np.asarray(
                    part[0], order="C"
                )  # ascontiguousarray would make a scalar (1,)
            else:
                out[name] = np.ascontiguousarray(np.moveaxis(part, 0, ax) if ax else part)
        return out

    def batches(self, size: int) -> Iterator[tuple[int, int, Feeds]]:
        """(start, stop, feeds) over every sample, ``size`` at a time (1 if an input is unbatched)."""
        size = size if self.batchable else 1
        for i in range(0, self.n, size):
            stop = min(self.n, i + size)
            yield i, stop, self.feeds(i, stop)

    def take(self, idx: npt.NDArray[np.integer[Any]] | slice) -> Split:
        return Split(
            {k: v[idx] for k, v in self.inputs.items()},
            None if self.y is None else self.y[idx],
            self.source,
            dict(self.batch_axes),
        )

    def head(self, count: int) -> Split:
        return self.take(slice(0, count))


@dataclass
class DataBundle:
    eval: Split
    calibration: Split
    train: Split | None = None


def read_npz(path: Path, role: str) -> dict[str, npt.NDArray[Any]]:
    """Every array of ``path`` (no pickles), or a one-line DataError."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{role} data {path}: file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{role} data {path}: not a readable .npz file ({exc})") from None
    if not arrays:
        raise DataError(f"{role} data {path}: holds no arrays")
    return arrays


def sample_shape(spec: IOSpec, batch_axis: int | None) -> tuple[int | str, ...]:
    """The spec's shape without its batch axis (what one sample of the data looks like)."""
    dims = list(spec.shape)
    if batch_axis is not None and batch_axis < len(dims):
        del dims[batch_axis]
    return tuple(dims)


def _fmt(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_split(
    arrays: Mapping[str, npt.NDArray[Any]],
    path: Path,
    role: str,
    specs: Sequence[IOSpec],
    batch_axes: Mapping[str, int | None],
    task: str,
    need_labels: bool,
) -> Split:
    """Match the arrays of one .npz to the model's inputs; every problem is one DataError line."""
    where = f"{role} data {path}"
    names = [s.name for s in specs]
    inputs: dict[str, npt.NDArray[Any]] = {}
    if len(specs) == 1 and names[0] not in arrays and "x" in arrays:
        inputs[names[0]] = arrays["x"]  # the single-array form
    else:
        missing = [n for n in names if n not in arrays]
        if missing:
            found = ", ".join(k for k in arrays if k != LABELS) or "none"
            raise DataError(
                f"{where}: no array for model input(s) {', '.join(missing)} (found: {found})"
            )
        inputs = {n: arrays[n] for n in names}
    n = None
    for spec in specs:
        arr = inputs[spec.name]
        ax = batch_axes.get(spec.name, 0)
        want = sample_shape(spec, ax)
        if arr.ndim == 0:
            raise DataError(
                f"{where}: {spec.name} is a scalar; give one value per sample (shape (N,))"
            )
        got = arr.shape[1:]
        ok = len(got) == len(want) and all(
            isinstance(w, str) or w < 0 or w == g for w, g in zip(want, got, strict=True)
        )
        if not ok:
            raise DataError(
                f"{where}: {spec.name} has shape {_fmt(arr.shape)}, expected {_fmt(('N', *want))}"
            )
        if dtype_kind(arr.dtype) != dtype_kind(spec.dtype):
            raise DataError(
                f"{where}: {spec.name} has dtype {arr.dtype}, the model takes {spec.dtype}"
            )
        if n is None:
            n = len(arr)
        elif len(arr) != n:
            raise DataError(f"{where}: {spec.name} has {len(arr)} samples, {specs[0].name} has {n}")
        if np.dtype(spec.dtype).kind == "f" and not np.all(np.isfinite(arr)):
            raise DataError(f"{where}: {spec.name} contains NaN or infinite values")
        if np.dtype(spec.dtype).kind in "iu":
            info = np.iinfo(np.dtype(spec.dtype))
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise DataError(f"{where}: {spec.name} holds values outside {spec.dtype}")
        inputs[spec.name] = arr.astype(spec.dtype, copy=False)
    if not n:
        raise DataError(f"{where}: holds no samples")
    y = _labels(arrays.get(LABELS), where, n, task, need_labels)
    return Split(inputs, y, str(path), {k: batch_axes.get(k, 0) for k in names})


def _labels(
    y: npt.NDArray[Any] | None, where: str, n: int, task: str, need: bool
) -> npt.NDArray[Any] | None:
    if y is None:
        if need:
            raise DataError(f"{where}: a classifier needs labels, but there is no array named 'y'")
        return None
    if y.ndim == 0 or len(y) != n:
        raise DataError(
            f"{where}: y has shape {_fmt(y.shape)}, expected {n} samples to match the inputs"
        )
    if task == "classification":
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: y has dtype {y.dtype}, expected integer class labels")
        if y.shape != (n,):
            raise DataError(
                f"{where}: y has shape {_fmt(y.shape)}, expected ({n},) to match the inputs"
            )
        if y.min() < 0:
            raise DataError(f"{where}: y holds negative labels")
        return y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where}: y has dtype {y.dtype}, expected numeric targets")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise DataError(f"{where}: y contains NaN or infinite values")
    return y


def load_split(
    path: Path,
    role: str,
    specs: Sequence[IOSpec],
    batch_axes: Mapping[str, int | None] | None = None,
    task: str = "classification",
    need_labels: bool = False,
) -> Split:
    """Load ``path`` and check it against the model inputs ``specs``."""
    return check_split(read_npz(path, role), path, role, specs, batch_axes or {}, task, need_labels)


def single_input(shape: Sequence[int], name: str = "input") -> list[IOSpec]:
    """The spec list of a one-input float32 model taking (batch, *shape)."""
    return [IOSpec(name, "float32", ("batch", *shape))]


def check_labels(split: Split, num_classes: int) -> None:
    if split.y is not None and int(split.y.max()) >= num_classes:
        raise DataError(
            f"{split.source}: label {int(split.y.max())} is out of range for a model with {num_classes} outputs"
        )


def collect_outputs(
    parts: Sequence[Mapping[str, npt.NDArray[Any]]], batch_axes: Mapping[str, int | None]
) -> Feeds:
    """Join per-batch runtime outputs into one array per output with samples on axis 0."""
    out: dict[str, list[npt.NDArray[Any]]] = {}
    for part in parts:
        for name, v in part.items():
            a = np.asarray(v)
            ax = batch_axes.get(name, 0)
            if a.ndim == 0 or ax is None:
                a = a[None, ...]
            elif ax:
                a = np.moveaxis(a, ax, 0)
            out.setdefault(name, []).append(a)
    return {k: np.concatenate(v) for k, v in out.items()}
