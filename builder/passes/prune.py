"""prune: unstructured magnitude (masks weights to zero) or structured channel pruning.

Structured pruning uses torch-pruning's dependency graph, so channels really disappear and
the model gets smaller and faster. Unstructured pruning only zeroes weights: it reports the
sparsity but does not shrink a dense ONNX file by itself. Either is followed by a short
fine-tune when training data is available.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import numpy as np

from agent.errors import ModelError
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext
from builder.train import count_params, finetune, training_targets

log = logging.getLogger(__name__)


class PruneConfig(PassConfig):
    method: Literal["structured", "unstructured"] = "structured"
    ratio: float = 0.5
    finetune_epochs: int = 15
    lr: float = 1e-3
    # Module names (as in named_modules) left untouched; the output layer is always kept.
    ignore: tuple[str, ...] = ()


def _output_layer(module: Any) -> Any:
    """The last Linear/Conv layer in definition order, whose outputs are the model's outputs."""
    import torch

    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not layers:
        raise ModelError("prune: the model has no Linear or Conv2d layers to prune")
    return layers[-1]


class PrunePass(Pass):
    name = "prune"
    description = (
        "Prune a torch model: structured channels (torch-pruning) or unstructured magnitude"
    )
    config_class = PruneConfig
    accepts = (ModelKind.TORCH,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.TORCH

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and isinstance(config, PruneConfig)
        if not 0.0 < config.ratio < 1.0:
            raise ModelError(f"prune: ratio must be between 0 and 1, got {config.ratio}")
        import torch

        torch.manual_seed(ctx.seed)
        module = copy.deepcopy(model.module).eval()
        params_before = count_params(module)
        named = dict(module.named_modules())
        missing = [n for n in config.ignore if n not in named]
        if missing:
            raise ModelError(f"prune: ignore names unknown modules: {', '.join(missing)}")
        attention = _attention_modules(module)
        if config.method == "structured" and attention:
            # Removing channels inside attention changes head dimensions that the attention's
            # reshape hard-codes; the exported model then fails. Skip rather than ship that.
            raise ModelError(
                f"prune: structured pruning skipped: the model has attention layers "
                f"({', '.join(sorted(attention)[:3])}); channel pruning would break head dimensions"
            )
        keep = [_output_layer(module), *(named[n] for n in config.ignore)]
        notes: dict[str, Any] = {"prune_method": config.method, "prune_ratio": config.ratio}
        if config.method == "structured":
            self._structured(module, model, config, keep, ctx)
        else:
            self._unstructured_mask(module, config, keep)
        if ctx.data.train is not None and config.finetune_epochs > 0:
            ctx.say(f"fine-tuning pruned model for up to {config.finetune_epochs} epochs")
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
        else:
            notes["finetune"] = None
        if config.method == "unstructured":
            from torch.nn.utils import prune as tprune

            for m in module.modules():
                if hasattr(m, "weight_orig"):
                    tprune.remove(m, "weight")  # type: ignore[no-untyped-call]
            notes["sparsity"] = _sparsity(module)
        module.eval()
        params_after = count_params(module)
        notes.update(params_before=params_before, params_after=params_after, params=params_after)
        return model.with_module(module, notes)

    @staticmethod
    def _structured(
        module: Any, model: ModelHandle, config: PruneConfig, keep: list[Any], ctx: PassContext
    ) -> None:
        import torch_pruning as tp

        from builder.torchio import to_torch

        example = to_torch(ctx.data.eval.feeds(0, 1), model.input_names)
        pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
        try:
            pruner = pruner_cls(
                module,
                example,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=config.ratio,
                ignored_layers=keep,
            )
            pruner.step()
        except Exception as exc:
            raise ModelError(
                f"prune: torch-pruning failed on this model: {type(exc).__name__}: {exc}"
            ) from None

    @staticmethod
    def _unstructured_mask(module: Any, config: PruneConfig, keep: list[Any]) -> None:
        import torch
        from torch.nn.utils import prune as tprune

        targets = [
            (m, "weight")
            for m in module.modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not any(m is k for k in keep)
        ]
        if not targets:
            raise ModelError("prune: no layers left to prune after ignoring the output layer")
        tprune.global_unstructured(
            targets, pruning_method=tprune.L1Unstructured, amount=config.ratio
        )


def _attention_modules(module: Any) -> list[str]:
    """Names of attention blocks (torch's MultiheadAttention, or any class named *Attention)."""
    import torch

    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.MultiheadAttention)
        or type(m).__name__.endswith(("Attention", "SelfAttention"))
    ]


def _sparsity(module: Any) -> float:
    import torch

    total = zeros = 0
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach().numpy()
            total += w.size
            zeros += int(np.count_nonzero(w == 0))
    return zeros / total if total else 0.0
