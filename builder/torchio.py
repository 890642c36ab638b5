"""Calling a torch module with named inputs of any dtype, and reading its outputs by name."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from builder.data import Feeds, Split, collect_outputs


def eval_mode(module: Any) -> Any:
    """``module.eval()``, except for a torch.export module, which is already in inference form
    (its eval() raises)."""
    with contextlib.suppress(NotImplementedError):
        module.eval()
    return module


def to_torch(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[Any, ...]:
    """The feeds as torch tensors, positionally in ``names`` order (their dtypes kept)."""
    import torch

    return tuple(torch.from_numpy(np.asarray(feeds[n], order="C")) for n in names)


def as_outputs(result: Any, names: Sequence[str]) -> Feeds:
    """A module's return value (tensor, tuple/list, or dict) as {output name: float array}."""
    if isinstance(result, Mapping):
        values = (
            [result[n] for n in names] if all(n in result for n in names) else list(result.values())
        )
    elif isinstance(result, (tuple, list)):
        values = list(result)
    else:
        values = [result]
    if len(values) != len(names):
        raise ValueError(
            f"the model returns {len(values)} outputs, the config names {len(names)} ({', '.join(names)})"
        )
    out: Feeds = {}
    for n, v in zip(names, values, strict=True):
        a = v.detach().cpu().numpy()
        out[n] = a.astype(np.float32) if a.dtype.kind == "f" else a
    return out


def call_module(
    module: Any,
    feeds: Mapping[str, np.ndarray],
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> Feeds:
    import torch

    with torch.no_grad():
        return as_outputs(module(*to_torch(feeds, input_names)), output_names)


def torch_outputs(
    module: Any,
    split: Split,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_axes: Mapping[str, int | None],
    batch: int = 64,
) -> Feeds:
    """Outputs of ``module`` on every sample of ``split`` (samples on axis 0)."""
    eval_mode(module)
    parts = [call_module(module, f, input_names, output_names) for _, _, f in split.batches(batch)]
    return collect_outputs(parts, batch_axes)
