"""Open Inference Protocol v2 tensors: JSON (and binary extension) request/response encoding.

Every problem with a request is a ``RequestError`` carrying the HTTP status to answer with,
so the server never turns a bad request into a 500.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.runtime import IOSpec

# numpy dtype name -> v2 datatype (BYTES is not supported: the runtimes here take numbers)
V2_DTYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
NP_DTYPES = {v: k for k, v in V2_DTYPES.items()}


class RequestError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class InferRequest:
    id: str | None
    feeds: dict[str, npt.NDArray[np.generic]]
    outputs: list[tuple[str, bool]] | None  # (name, binary); None: every output
    binary_default: bool
    label: Any = None  # parameters.label: an application's label for feedback capture


def v2_shape(spec: IOSpec) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]


def spec_json(spec: IOSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": V2_DTYPES.get(spec.dtype, spec.dtype.upper()),
        "shape": v2_shape(spec),
    }


def _obj(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise RequestError(400, f"{what} must be a JSON object")
    return doc


def _params(doc: dict[str, Any], what: str) -> dict[str, Any]:
    return _obj(doc.get("parameters", {}), f"{what}.parameters")


def _from_binary(
    name: str, raw: memoryview, dtype: np.dtype[Any], shape: list[int]
) -> npt.NDArray[Any]:
    """A binary tensor (little-endian, row-major; BOOL one byte, 0 or 1) as a native array."""
    if dtype == np.bool_:
        octets = np.frombuffer(raw, dtype=np.uint8)
        if np.any(octets > 1):
            raise RequestError(
                400, f"input '{name}': BOOL binary data has bytes other than 0 and 1"
            )
        return octets.astype(np.bool_).reshape(shape)
    arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    return arr.astype(dtype, copy=False).reshape(shape)


def _from_json(name: str, data: Any, dtype: np.dtype[Any], want: str) -> npt.NDArray[Any]:
    """JSON ``data`` (flat or nested) as ``dtype``; refused rather than rounded or wrapped: an
    integer tensor takes integers, BOOL takes true/false (or 0/1), a float tensor any number."""
    what = f"{want} {'values' if dtype.kind == 'b' else 'numbers'}"
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise RequestError(400, f"input '{name}': data is not a list of {what}") from None
    kind = raw.dtype.kind
    if dtype.kind == "b":
        ok = kind == "b" or (kind in "iu" and bool(np.all((raw == 0) | (raw == 1))))
    elif dtype.kind in "iu":
        ok = kind in "iu"
    else:
        ok = kind in "iuf"
    if raw.size == 0:
        ok = True  # an empty list has dtype float64 whatever the tensor
    if not ok:
        raise RequestError(400, f"input '{name}': data is not a list of {what}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise RequestError(400, f"input '{name}': a value is out of the {want} range")
    try:
        return raw.astype(dtype)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(400, f"input '{name}': data is not a list of {what}") from None


def parse_infer(
    body: bytes | bytearray, header_len: int | None, inputs: list[IOSpec], outputs: list[IOSpec]
) -> InferRequest:
    """Decode and check an infer request against the model's inputs and outputs."""
    if header_len is not None:
        if header_len < 0 or header_len > len(body):
            raise RequestError(400, "Inference-Header-Content-Length is larger than the body")
        head, binary = body[:header_len], memoryview(body)[header_len:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = _obj(json.loads(head), "request")
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(400, "request body is not valid JSON") from None
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError(400, "id must be a string")
    reqs = doc.get("inputs")
    if not isinstance(reqs, list) or not reqs:
        raise RequestError(400, "inputs must be a non-empty list")
    specs = {s.name: s for s in inputs}
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    offset = 0
    for i, raw in enumerate(reqs):
        t = _obj(raw, f"inputs[{i}]")
        name = t.get("name")
        if not isinstance(name, str) or name not in specs:
            raise RequestError(
                400, f"inputs[{i}]: unknown input {name!r} (the model takes {', '.join(specs)})"
            )
        if name in feeds:
            raise RequestError(400, f"input '{name}' given twice")
        spec = specs[name]
        want = V2_DTYPES.get(spec.dtype)
        if t.get("datatype") != want or want is None:
            raise RequestError(
                400, f"input '{name}': datatype {t.get('datatype')!r}, the model expects {want}"
            )
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RequestError(
                400, f"input '{name}': shape must be a list of non-negative integers"
            )
        expect = v2_shape(spec)
        if len(shape) != len(expect) or any(
            e != -1 and e != d for e, d in zip(expect, shape, strict=True)
        ):
            raise RequestError(
                400, f"input '{name}': shape {shape}, the model expects {expect} (-1: any)"
            )
        dtype = np.dtype(spec.dtype)
        count = math.prod(shape)
        size = _params(t, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(
                    400, f"input '{name}': binary_data_size must be a non-negative integer"
                )
            if size != count * dtype.itemsize:
                raise RequestError(
                    400,
                    f"input '{name}': binary_data_size {size}, shape {shape} of "
                    f"{want} needs {count * dtype.itemsize}",
                )
            if offset + size > len(binary):
                raise RequestError(
                    400, f"input '{name}': binary data is shorter than binary_data_size"
                )
            arr = _from_binary(name, binary[offset : offset + size], dtype, shape)
            offset += size
        else:
            if "data" not in t:
                raise RequestError(
                    400, f"input '{name}': no data (JSON 'data' or binary_data_size)"
                )
            arr = _from_json(name, t["data"], dtype, want)
            if arr.size != count:
                raise RequestError(
                    400, f"input '{name}': {arr.size} values for shape {shape} ({count})"
                )
            arr = arr.reshape(shape)
        feeds[name] = arr
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes of binary data that no input claims")
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise RequestError(400, f"missing input(s): {', '.join(missing)}")
    binary_default = bool(_params(doc, "request").get("binary_data_output", False))
    out_req = doc.get("outputs")
    wanted: list[tuple[str, bool]] | None = None
    if out_req is not None:
        if not isinstance(out_req, list):
            raise RequestError(400, "outputs must be a list")
        names = {s.name for s in outputs}
        wanted = []
        for i, raw in enumerate(out_req):
            o = _obj(raw, f"outputs[{i}]")
            oname = o.get("name")
            if not isinstance(oname, str) or oname not in names:
                raise RequestError(
                    400,
                    f"outputs[{i}]: unknown output {oname!r} (the model gives "
                    f"{', '.join(sorted(names))})",
                )
            wanted.append(
                (oname, bool(_params(o, f"outputs[{i}]").get("binary_data", binary_default)))
            )
    label = check_label(_params(doc, "request").get("label"))
    return InferRequest(rid if isinstance(rid, str) else None, feeds, wanted, binary_default, label)


MAX_LABEL_ITEMS = 4096


def check_label(v: Any) -> Any:
    """A label is a number or a list (of at most MAX_LABEL_ITEMS numbers, nested or not)."""
    if v is None:
        return None
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if isinstance(v, list):
        try:
            a = np.asarray(v)
            ok = a.dtype.kind in "iuf" and a.size <= MAX_LABEL_ITEMS and bool(np.isfinite(a).all())
        except (ValueError, TypeError, OverflowError, RecursionError):
            ok = False
    elif isinstance(v, float):
        ok = np.isfinite(v)
    if not ok:
        raise RequestError(400, "parameters.label must be a number or a list of numbers")
    return v


def encode_response(
    name: str, version: str, req: InferRequest, result: dict[str, npt.NDArray[np.generic]]
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    chosen = req.outputs if req.outputs is not None else [(n, req.binary_default) for n in result]
    outs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for oname, binary in chosen:
        arr = np.asarray(result[oname])
        dt = V2_DTYPES.get(arr.dtype.name)
        if dt is None:  # e.g. a string output: give it back as FP32 is wrong, so say so
            raise RequestError(
                500, f"output '{oname}' has dtype {arr.dtype.name}, not a v2 datatype"
            )
        o: dict[str, Any] = {"name": oname, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            # v2 binary tensors are little-endian, row-major; BOOL is one byte per element
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            o["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                # JSON has no NaN or Infinity (Python's json would write invalid JSON): refused,
                # like OpenVINO Model Server; binary data carries them as IEEE floats.
                raise RequestError(
                    500,
                    f"output '{oname}' holds non-finite values (NaN or Infinity), which JSON "
                    f"cannot carry: ask for it as binary data "
                    f'(outputs: [{{"name": "{oname}", "parameters": {{"binary_data": true}}}}])',
                )
            o["data"] = arr.ravel().tolist()
        outs.append(o)
    doc: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outs}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
