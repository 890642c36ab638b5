"""Tiny models and build projects made in code for the builder's tests.

Every model here runs in milliseconds: factories written as .py files (what a user gives the
builder), and ONNX graphs put together with onnx.helper (a model that names its own inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from builder.cli import main

# A float MLP: 4 features in, 3 classes (or 3 regression outputs) out.
MLP = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
"""

# Two int64 inputs, positionally (input_ids, attention_mask): an embedding bag with a masked mean.
BAG = """
import torch
from torch import nn


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.out(h)


def build():
    torch.manual_seed(0)
    return Bag()
"""

# A streaming step in torch: input (batch, 64), state (2, batch, 32), sr a scalar int64.
STEP = """
import torch
from torch import nn


class Step(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, input, state, sr):
        h = torch.tanh(self.fc(input) + state.sum(0) * (sr.to(torch.float32) / 16000.0))
        return self.out(h), torch.stack([h, h])


def build():
    torch.manual_seed(0)
    return Step()
"""

PROFILE = """name = "{name}"
description = "test profile"

[hardware]
arch = "x86_64"
cores = 2
ram_mb = 2048

[runtime]
name = "onnxruntime"
threads = 1

[build]
candidates = [{candidates}]
select = "{select}"

[budgets]
{budgets}
"""

GENEROUS = {
    "max_artifact_kb": 100000,
    "max_accuracy_drop_pt": 100,
    "max_p95_ms": 10000,
    "max_ram_mb": 100000,
    "min_cosine": 0.9,
}


def write_profile(
    directory: Path, name: str, candidates: list[str], select: str = "smallest", **budgets: float
) -> Path:
    """A profile .toml named ``name`` with generous budgets, ``budgets`` replacing any of them."""
    b = {**GENEROUS, **budgets}
    path = directory / f"{name}.toml"
    path.write_text(
        PROFILE.format(
            name=name,
            candidates=", ".join(f'"{c}"' for c in candidates),
            select=select,
            budgets="\n".join(f"{k} = {v}" for k, v in b.items()),
        )
    )
    return path


@dataclass
class Project:
    dir: Path
    config: Path
    key: Path

    def build(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        """``edgefleet build CONFIG ARGS`` into this project's out/ and cache/; (code, stdout, stderr)."""
        return run_cli(
            capsys,
            "build",
            str(self.config),
            "--key",
            str(self.key),
            "--out",
            str(self.dir / "out"),
            "--cache-dir",
            str(self.dir / "cache"),
            *args,
        )


def project(
    directory: Path,
    config: str,
    files: dict[str, str] | None = None,
    data: dict[str, dict[str, np.ndarray]] | None = None,
    task: str = "classification",
) -> Project:
    """A build project in ``directory``: edgefleet.toml (``config`` after name/version/task),
    source files, .npz data files (name -> arrays) and a signing key."""
    from agent.protocol.signing import generate_keypair

    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    for name, arrays in (data or {}).items():
        np.savez(directory / name, **arrays)  # type: ignore[arg-type]
    cfg = directory / "edgefleet.toml"
    cfg.write_text(f'name = "tiny"\nversion = "1.0.0"\ntask = "{task}"\n{config}')
    key = generate_keypair(directory / "keys")[0]
    return Project(directory, cfg, key)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, exit_code: int, *needles: str) -> str:
    """The command failed with ``exit_code`` and one ``error:`` line (the last), no traceback."""
    assert code == exit_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- data


def mlp_data(n: int = 64, seed: int = 0, y: str = "int") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    out = {"x": x}
    if y == "int":
        out["y"] = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)
    elif y == "float":
        out["y"] = rng.normal(size=(n, 3)).astype(np.float32)
    return out


def token_data(n: int = 48, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """input_ids and attention_mask, int64 (n, seq): each row a random length >= 2 of ids < 50."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, size=(n, seq), dtype=np.int64)
    lengths = rng.integers(2, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def state_data(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Samples for stateful_onnx: input (n, 64), state (n, 2, 32) (batch axis 1 in a feed), sr (n,)."""
    rng = np.random.default_rng(seed)
    return {
        "input": rng.normal(size=(n, 64)).astype(np.float32),
        "state": rng.normal(scale=0.5, size=(n, 2, 32)).astype(np.float32),
        "sr": np.full(n, 16000, np.int64),
    }


# ---------------------------------------------------------------- ONNX models


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # type: ignore[arg-type]
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _weights(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.5) -> object:
    from onnx import numpy_helper

    return numpy_helper.from_array(
        np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32), name
    )


def float_onnx(path: Path, hidden: int = 32) -> Path:
    """x float32 (batch, 4) -> MatMul/Relu/MatMul -> y float32 (batch, 3)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[_weights("w1", (4, hidden), 1), _weights("w2", (hidden, 3), 2)],
    )  # type: ignore[list-item]
    return _save(graph, path)


def two_input_onnx(path: Path) -> Path:
    """input_ids, attention_mask int64 (batch, 8) -> Cast(ids * mask) @ W -> logits (batch, 3)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["m"]),
        helper.make_node("Cast", ["m"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["f", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 8]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 8]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[_weights("w", (8, 3), 3)],
    )  # type: ignore[list-item]
    return _save(graph, path)


def stateful_onnx(path: Path) -> Path:
    """A VAD-like step: input (batch, 64), state (2, batch, 32), sr int64 scalar ->
    output (batch, 1), stateN (2, batch, 32). The batch axis of state and stateN is 1."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "base"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "base"], ["scale"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Add", ["h", "ss"], ["hs"]),
        helper.make_node("Tanh", ["hs"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["output"]),
        helper.make_node("Unsqueeze", ["t", "axis0"], ["t1"]),
        helper.make_node("Concat", ["t1", "t1"], ["stateN"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 32]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 32]),
        ],
        initializer=[_weights("w1", (64, 32), 4, 0.1), _weights("w2", (32, 1), 5), *consts],
    )  # type: ignore[list-item]
    return _save(graph, path)
