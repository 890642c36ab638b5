"""Small training loops shared by passes (fine-tune after pruning) and the examples."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from builder.data import Split


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def accuracy(module: Any, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    import torch

    module.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = module(torch.from_numpy(x[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == y[i : i + batch]).sum())
    return correct / len(x)


def finetune(
    module: Any, train: Split, epochs: int, lr: float, seed: int, batch: int = 64, loss: Any = None,
    patience: int = 5,
) -> dict[str, Any]:
    """Adam on 90% of ``train``; keeps the weights that score best on the other 10%.

    ``loss(logits, x, y)`` defaults to cross-entropy; distillation passes its own. Early
    stopping looks at a split of the training data, never at the eval set the gate measures on.
    """
    import torch

    assert train.y is not None, "fine-tuning needs labels"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train.x))
    n_val = max(1, len(order) // 10)
    val_idx, tr_idx = order[:n_val], order[n_val:]
    xv, yv = train.x[val_idx], train.y[val_idx]
    xt, yt = torch.from_numpy(train.x[tr_idx]), torch.from_numpy(train.y[tr_idx])
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    ce = torch.nn.CrossEntropyLoss()
    loss_fn = loss or (lambda logits, xb, yb: ce(logits, yb))
    best_acc, best_state, best_epoch = accuracy(module, xv, yv), copy.deepcopy(module.state_dict()), 0
    stale = 0
    for epoch in range(1, epochs + 1):
        module.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            value = loss_fn(module(xt[idx]), xt[idx], yt[idx])
            value.backward()
            opt.step()
        acc = accuracy(module, xv, yv)
        if acc > best_acc:
            best_acc, best_state, best_epoch, stale = acc, copy.deepcopy(module.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    module.load_state_dict(best_state)
    module.eval()
    return {"epochs_run": epoch if epochs else 0, "best_epoch": best_epoch, "val_top1": round(best_acc, 4)}
