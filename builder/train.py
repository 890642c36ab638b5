"""Small training loops shared by passes (fine-tune after pruning, low-rank, distillation) and
the examples.

A model takes named inputs (any dtype) and its first output is trained. Classifiers with
labels learn cross-entropy on the labels; everything else (regression, embeddings, or a
classifier without labels) learns to reproduce *targets*: float ``y`` when the data has it,
otherwise the original model's own outputs (self-distillation), so pruning and low-rank
fine-tuning work for models no one labelled.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from builder.data import Split
from builder.torchio import eval_mode

# loss(output, feeds, target) -> scalar tensor; target is labels or the teacher's output
Loss = Callable[[Any, tuple[Any, ...], Any], Any]


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def first_output(out: Any) -> Any:
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensors(split: Split, names: Sequence[str], idx: np.ndarray) -> tuple[Any, ...]:
    import torch

    feeds = split.take(idx).feeds(0, len(idx))
    return tuple(torch.from_numpy(np.asarray(feeds[n], order="C")) for n in names)


def predict(module: Any, split: Split, names: Sequence[str], batch: int = 256) -> np.ndarray:
    """The module's first output on every sample of ``split`` (batch axis 0)."""
    import torch

    eval_mode(module)
    parts = []
    with torch.no_grad():
        for i in range(0, split.n, batch):
            idx = np.arange(i, min(split.n, i + batch))
            parts.append(first_output(module(*_tensors(split, names, idx))).float().numpy())
    return np.concatenate(parts)


def accuracy(
    module: Any, split: Split, names: Sequence[str] | None = None, batch: int = 256
) -> float:
    assert split.y is not None, "accuracy needs labels"
    out = predict(module, split, names or list(split.inputs), batch)
    return float(np.mean(out.reshape(len(out), -1).argmax(1) == split.y))


def training_targets(
    teacher: Any, split: Split, names: Sequence[str], task: str
) -> np.ndarray | None:
    """What a fine-tune of a copy of ``teacher`` learns: None for labelled classification
    (cross-entropy on ``y``), float targets when the data has them, else the teacher's outputs."""
    if task == "classification" and split.y is not None:
        return None
    if split.y is not None and np.issubdtype(split.y.dtype, np.floating):
        return split.y.astype(np.float32)
    return predict(teacher, split, names)


def finetune(
    module: Any,
    train: Split,
    epochs: int,
    lr: float,
    seed: int,
    batch: int = 64,
    loss: Loss | None = None,
    patience: int = 5,
    names: Sequence[str] | None = None,
    targets: np.ndarray | None = None,
) -> dict[str, Any]:
    """Adam on 90% of ``train``; keeps the weights that score best on the other 10%.

    Without ``targets`` the loss is cross-entropy on the labels and the score top-1; with
    ``targets`` (float, one per sample) the loss is mean squared error on the first output and
    the score its negative. ``loss(output, inputs, target)`` replaces either (distillation).
    Early stopping looks at a split of the training data, never at the eval set the gate
    measures on.
    """
    import torch

    names = list(names or train.inputs)
    regression = targets is not None
    if not regression:
        assert train.y is not None, "fine-tuning a classifier needs labels (or targets)"
    labels = torch.from_numpy(targets if regression else np.asarray(train.y))
    rng = np.random.default_rng(seed)
    order = rng.permutation(train.n)
    n_val = max(1, len(order) // 10)
    val_idx, tr_idx = order[:n_val], order[n_val:]
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    ce, mse = torch.nn.CrossEntropyLoss(), torch.nn.MSELoss()

    def default_loss(out: Any, xb: tuple[Any, ...], yb: Any) -> Any:
        return mse(out.reshape(yb.shape), yb) if regression else ce(out, yb)

    loss_fn = loss or default_loss

    def score() -> float:
        out = predict(module, train.take(val_idx), names)
        want = labels[val_idx].numpy()
        if regression:
            return -float(np.mean((out.reshape(want.shape) - want) ** 2))
        return float(np.mean(out.reshape(len(out), -1).argmax(1) == want))

    best, best_state, best_epoch = score(), copy.deepcopy(module.state_dict()), 0
    stale = 0
    epoch = 0
    for epoch in range(1, epochs + 1):
        module.train()
        perm = rng.permutation(tr_idx)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            xb = _tensors(train, names, idx)
            opt.zero_grad()
            value = loss_fn(first_output(module(*xb)), xb, labels[idx])
            value.backward()
            opt.step()
        s = score()
        if s > best:
            best, best_state, best_epoch, stale = s, copy.deepcopy(module.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    module.load_state_dict(best_state)
    eval_mode(module)
    key = "val_mse" if regression else "val_top1"
    return {
        "epochs_run": epoch if epochs else 0,
        "best_epoch": best_epoch,
        key: round(abs(best), 6),
        "targets": ("float targets" if train.y is not None else "fp32 model outputs")
        if regression
        else "labels",
    }
