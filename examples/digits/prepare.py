"""Train the digits CNN (fixed seed) and write the data and weights the build config names.

Writes into examples/digits/work/: digits_cnn.pt (state_dict), train/calib/eval .npz files,
and a signing key pair under keys/ if none exists. Re-running reuses finished outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


def make_data(work: Path, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # (1797, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_eval, n_cal = 450, 200
    ev, cal, tr = idx[:n_eval], idx[n_eval : n_eval + n_cal], idx[n_eval + n_cal :]
    np.savez(work / "eval.npz", x=x[ev], y=y[ev])
    np.savez(work / "calib.npz", x=x[cal])
    np.savez(work / "train.npz", x=x[np.concatenate([tr, cal])], y=y[np.concatenate([tr, cal])])


def train(work: Path, epochs: int = 30, seed: int = 0) -> float:
    import torch

    sys.path.insert(0, str(HERE))
    from model import build_cnn

    from builder.data import load_split, single_input
    from builder.train import accuracy, finetune

    torch.manual_seed(seed)
    model = build_cnn()
    spec = single_input((1, 8, 8))
    tr = load_split(work / "train.npz", "train", spec, need_labels=True)
    ev = load_split(work / "eval.npz", "eval", spec, need_labels=True)
    finetune(model, tr, epochs=epochs, lr=2e-3, seed=seed)
    torch.save(model.state_dict(), work / "digits_cnn.pt")
    return accuracy(model, ev)


def retrain(
    work: Path, extra: Path, out: Path, holdout: Path, epochs: int = 10, seed: int = 0
) -> dict[str, float]:
    """The next version's weights: the trained CNN fine-tuned on its training data plus
    ``extra`` (labelled samples the fleet captured, from `edgefleet feedback export`), written
    to ``out``. Accuracy on ``holdout`` (captured samples kept out of training) before and after.
    """
    import torch

    sys.path.insert(0, str(HERE))
    from model import build_cnn

    from builder.data import Split, load_split, single_input
    from builder.train import accuracy, finetune

    torch.manual_seed(seed)
    model = build_cnn()
    model.load_state_dict(torch.load(work / "digits_cnn.pt", weights_only=True))
    spec = single_input((1, 8, 8))
    tr = load_split(work / "train.npz", "train", spec, need_labels=True)
    new = load_split(extra, "captured", spec, need_labels=True)
    held = load_split(holdout, "captured holdout", spec, need_labels=True)
    before = accuracy(model, held)
    assert tr.y is not None and new.y is not None
    both = Split(
        {"input": np.concatenate([tr.inputs["input"], new.inputs["input"]])},
        np.concatenate([tr.y, new.y]),
        f"{tr.source} + {new.source}",
    )
    finetune(model, both, epochs=epochs, lr=1e-3, seed=seed)
    torch.save(model.state_dict(), out)
    return {"holdout_top1_before": before, "holdout_top1_after": accuracy(model, held)}


def prepare(work: Path = WORK, force: bool = False, quiet: bool = False) -> None:
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    if force or not (work / "eval.npz").exists():
        make_data(work)
        say(f"digits data written to {work}")
    if force or not (work / "digits_cnn.pt").exists():
        say("training the digits CNN (fixed seed)...")
        acc = train(work)
        say(f"digits CNN trained: eval top-1 {acc:.4f}")
    if not (work / "keys" / "edgefleet.key").exists():
        from agent.protocol.signing import generate_keypair

        priv, pub = generate_keypair(work / "keys")
        say(f"signing key created: {priv} (public: {pub})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="retrain and rewrite the data")
    prepare(force=ap.parse_args().force)
