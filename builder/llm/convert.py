"""GGUF -> Hugging Face folder -> onnxruntime-genai folders, each step in its own process
(torch and the genai model builder take ~2 GB and print a lot) and cached by the source's hash.

onnxruntime-genai's builder cannot read a quantized GGUF, so a GGUF is first dequantized to a
float HF folder (config.json, model.safetensors, tokenizer and chat template from its metadata).

    python -m builder.llm.convert GGUF OUT_DIR      # the GGUF -> HF step alone
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from agent.errors import DependencyError, ModelError
from agent.protocol.artifact import file_sha256
from builder.llm.config import CANDIDATES

# The files an onnxruntime-genai model folder needs on the device.
GENAI_FILES = (
    "genai_config.json",
    "model.onnx",
    "model.onnx.data",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def source_digest(path: Path) -> str:
    """sha256 of a GGUF file, or of a folder's file names and contents."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def genai_version() -> str:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise DependencyError(
            "text-generation builds need the Python package 'onnxruntime-genai': "
            "pip install 'edgefleet[builder,llm]'"
        ) from None
    return str(og.__version__)


def _run(args: list[str], log: Path, what: str) -> None:
    env = {**os.environ, **OFFLINE}
    with log.open("w") as out:
        proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise ModelError(f"{what} failed: {tail[0] if tail else proc.returncode} (log: {log})")


def hf_folder(source: Path, work: Path, progress: Callable[[str], None]) -> Path:
    """The float HF folder of ``source``: itself when it is one, else the converted GGUF."""
    if source.is_dir():
        return source
    out = work / "hf"
    if (out / "config.json").is_file():
        return out
    progress(f"dequantizing {source.name} to a float Hugging Face folder")
    tmp = work / "hf.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(
        [sys.executable, "-m", "builder.llm.convert", str(source), str(tmp)],
        work / "hf.log",
        f"GGUF conversion of {source.name}",
    )
    tmp.rename(out)
    return out


def genai_folder(hf: Path, candidate: str, work: Path, progress: Callable[[str], None]) -> Path:
    """Build (or reuse) the onnxruntime-genai folder of ``candidate`` from the HF folder."""
    out = work / f"genai-{candidate}"
    if (out / "genai_config.json").is_file():
        return out
    precision, provider, extra = CANDIDATES[candidate]
    progress(f"building the onnxruntime-genai {candidate} model ({precision}, {provider})")
    tmp = work / f"genai-{candidate}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    args = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(tmp),
        "-p",
        precision,
        "-e",
        provider,
        "-c",
        str(work / "hf-cache"),
    ]
    if extra:
        args += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    _run(args, work / f"genai-{candidate}.log", f"onnxruntime-genai build of {candidate}")
    missing = [f for f in ("genai_config.json", "model.onnx") if not (tmp / f).is_file()]
    if missing:
        raise ModelError(f"onnxruntime-genai build of {candidate} wrote no {', '.join(missing)}")
    tmp.rename(out)
    return out


def model_files(folder: Path) -> dict[str, Path]:
    """The files of a genai folder that go into the artifact, as ``model/NAME`` members."""
    return {f"model/{name}": folder / name for name in GENAI_FILES if (folder / name).is_file()}


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a float32 HF folder (transformers reads GGUF metadata and
    tensors; the weights are loaded without accelerate, which from_pretrained would want)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    load = load_gguf_checkpoint  # untyped
    tensors = load(str(gguf), return_tensors=True, model_to_load=model)["tensors"]  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"{gguf.name}: weights do not fit the architecture "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


if __name__ == "__main__":
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
    gguf_to_hf(Path(sys.argv[1]), Path(sys.argv[2]))
