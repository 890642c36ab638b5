"""lowrank: replace Linear layers (and 1x1 convolutions) by two thinner ones from a truncated SVD.

W (out x in) ~= (U_r sqrt(S_r)) (sqrt(S_r) Vh_r): an (in -> r) layer followed by an (r -> out)
layer with the original bias. The rank comes from an energy threshold (the share of the sum of
squared singular values kept), a ratio of the full rank, or a fixed rank; a layer is only
replaced when that saves parameters. A short fine-tune follows when training data is given.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np

from agent.errors import ModelError
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext
from builder.train import count_params, finetune, training_targets


class LowRankConfig(PassConfig):
    method: Literal["energy", "ratio", "rank"] = "energy"
    energy: float = 0.9
    ratio: float = 0.5
    rank: int | None = None
    # Layers with fewer weights than this are left alone (not worth two kernels).
    min_params: int = 4096
    finetune_epochs: int = 10
    lr: float = 5e-4


def choose_rank(s: np.ndarray, config: LowRankConfig, layer: str) -> int:
    """Rank for singular values ``s`` (descending) under ``config``."""
    full = len(s)
    if config.method == "rank":
        if config.rank is None or config.rank < 1:
            raise ModelError("lowrank: method 'rank' needs rank >= 1")
        if config.rank > full:
            raise ModelError(
                f"lowrank: rank {config.rank} is larger than layer '{layer}' allows (at most {full})"
            )
        return config.rank
    if config.method == "ratio":
        if not 0.0 < config.ratio <= 1.0:
            raise ModelError(f"lowrank: ratio must be in (0, 1], got {config.ratio}")
        return max(1, math.ceil(config.ratio * full))
    if not 0.0 < config.energy <= 1.0:
        raise ModelError(f"lowrank: energy must be in (0, 1], got {config.energy}")
    e = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.searchsorted(e / e[-1], config.energy - 1e-12) + 1)


def _factor(weight: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vh = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:r])
    return (vh[:r] * root[:, None]).astype(np.float32), (u[:, :r] * root[None, :]).astype(
        np.float32
    )


def _replacement(layer: Any, r: int) -> Any:
    import torch
    from torch import nn

    first: nn.Module
    second: nn.Module
    if isinstance(layer, nn.Linear):
        w = layer.weight.detach().numpy()
        first_w, second_w = _factor(w, r)
        first = nn.Linear(layer.in_features, r, bias=False)
        second = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
    else:
        w = layer.weight.detach().numpy()[:, :, 0, 0]
        first_w, second_w = _factor(w, r)
        first_w, second_w = first_w[:, :, None, None], second_w[:, :, None, None]
        first = nn.Conv2d(layer.in_channels, r, 1, stride=layer.stride, bias=False)
        second = nn.Conv2d(r, layer.out_channels, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(first_w))
        second.weight.copy_(torch.from_numpy(second_w))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)  # type: ignore[union-attr]
    return nn.Sequential(first, second)


def _candidates(module: Any) -> list[tuple[str, Any]]:
    from torch import nn

    def pointwise(m: Any) -> bool:
        return (
            isinstance(m, nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.groups == 1
            and m.padding in ((0, 0), 0)
            and m.dilation == (1, 1)
        )

    return [
        (name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear) or pointwise(m)
    ]


def _set(module: Any, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


class LowRankPass(Pass):
    name = "lowrank"
    description = (
        "Factor Linear and 1x1 Conv layers with a truncated SVD (rank by energy, ratio or fixed)"
    )
    config_class = LowRankConfig
    accepts = (ModelKind.TORCH,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.TORCH

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and isinstance(config, LowRankConfig)
        module = copy.deepcopy(model.module).eval()
        params_before = count_params(module)
        layers = []
        for name, layer in _candidates(module):
            w = layer.weight.detach().numpy().reshape(layer.weight.shape[0], -1)
            n_out, n_in = w.shape
            s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
            r = choose_rank(s, config, name)
            before = n_out * n_in
            after = r * (n_in + n_out)
            entry = {
                "layer": name,
                "shape": [n_out, n_in],
                "rank": r,
                "full_rank": len(s),
                "params_before": before,
                "params_after": min(before, after),
                "replaced": False,
            }
            if before >= config.min_params and after < before:
                _set(module, name, _replacement(layer, r))
                entry["replaced"] = True
            layers.append(entry)
        if not any(e["replaced"] for e in layers):
            raise ModelError(
                "lowrank: no layer could be factored with fewer parameters "
                f"({len(layers)} Linear/1x1 layers looked at; lower energy/ratio/rank or min_params)"
            )
        notes: dict[str, Any] = {"lowrank_layers": layers}
        if ctx.data.train is not None and config.finetune_epochs > 0:
            ctx.say(f"fine-tuning low-rank model for up to {config.finetune_epochs} epochs")
            names = model.input_names
            targets = training_targets(model.module, ctx.data.train, names, ctx.task)
            notes["finetune"] = finetune(
                module,
                ctx.data.train,
                config.finetune_epochs,
                config.lr,
                ctx.seed,
                names=names,
                targets=targets,
            )
        module.eval()
        params_after = count_params(module)
        notes.update(params_before=params_before, params_after=params_after, params=params_after)
        return model.with_module(module, notes)
