"""An ONNX file's IR version and opsets, read without the `onnx` package, and the one-line reason
given when the installed onnxruntime is too old to load it.

A device may carry an older onnxruntime than the builder's (onnxruntime 1.17 loads up to IR 9;
torch's exporter writes IR 10). The agent refuses such a model with a reason naming both sides
instead of a raw loader error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

# ModelProto field numbers (onnx.proto3): ir_version = 1, opset_import = 8.
_IR_VERSION, _OPSET_IMPORT = 1, 8


@dataclass(frozen=True)
class OnnxVersions:
    ir_version: int
    opsets: dict[str, int] = field(default_factory=dict)  # domain ("ai.onnx" for "") -> version

    def describe(self) -> str:
        ops = ", ".join(f"{d} {v}" for d, v in sorted(self.opsets.items()))
        return f"ONNX IR {self.ir_version}, opset {ops or 'none'}"


def _varint(f: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            return None if shift == 0 else _truncated()
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _truncated() -> int:
    raise ValueError("truncated protobuf")


def _opset(data: bytes) -> tuple[str, int]:
    """Decode one OperatorSetIdProto (domain = 1, version = 2)."""
    import io

    f, domain, version = io.BytesIO(data), "", 0
    while (key := _varint(f)) is not None:
        num, wire = key >> 3, key & 7
        if wire == 0:
            v = _varint(f) or 0
            if num == 2:
                version = v
        elif wire == 2:
            raw = f.read(_varint(f) or 0)
            if num == 1:
                domain = raw.decode("utf-8", "replace")
        else:
            f.seek({1: 8, 5: 4}.get(wire, 0), 1)
    return domain or "ai.onnx", version


def read_versions(path: Path) -> OnnxVersions:
    """Walk the top-level fields of ``path`` (seeking past the graph); ValueError if it is not ONNX."""
    ir, opsets = 0, {}
    with open(path, "rb") as f:
        while (key := _varint(f)) is not None:
            num, wire = key >> 3, key & 7
            if wire == 0:
                v = _varint(f)
                if v is None:
                    _truncated()
                if num == _IR_VERSION:
                    ir = int(v or 0)
            elif wire == 2:
                n = _varint(f)
                if n is None:
                    _truncated()
                if num == _OPSET_IMPORT:
                    domain, version = _opset(f.read(int(n or 0)))
                    opsets[domain] = version
                else:
                    f.seek(int(n or 0), 1)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
            else:
                raise ValueError(f"not an ONNX model (protobuf wire type {wire})")
    if ir == 0:
        raise ValueError("not an ONNX model (no ir_version)")
    return OnnxVersions(ir, opsets)


_IR_RE = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_OPSET_RE = re.compile(
    r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S
)


def too_new(path: Path, runtime_version: str, load_error: str) -> str | None:
    """The REJECTED reason when ``load_error`` says the runtime is older than the model, else None."""
    try:
        model = read_versions(path).describe()
    except (OSError, ValueError):
        model = "unreadable header"
    if m := _IR_RE.search(load_error):
        limit = f"loads up to IR {m.group(2)}"
    elif m := _OPSET_RE.search(load_error):
        limit = f"supports {m.group(2)} up to opset {m.group(3)}"
    else:
        return None
    return (
        f"{path.name} is {model}; the installed onnxruntime {runtime_version} {limit} "
        "(upgrade onnxruntime on the device or build with an older opset/IR)"
    )
