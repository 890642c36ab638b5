"""Golden vectors (golden.npz in the artifact) and the self-test that checks a runtime with them.

golden.npz holds, for each model input ``in:NAME`` and each output ``ref:NAME`` (fp32 reference
outputs) and ``exp:NAME`` (this candidate's outputs on the build host). The self-test runs the
inputs on the device and requires:
  * |device - expected| <= atol + rtol * |expected| for every output element (the runtime
    behaves as it did on the build host), and
  * for classifiers, top-1 agreement with the fp32 reference >= min_top1_agreement.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.protocol.manifest import Golden
from agent.runtime.base import InferenceSession

Arrays = dict[str, npt.NDArray[np.generic]]


@dataclass
class GoldenSet:
    inputs: Arrays
    reference: Arrays
    expected: Arrays

    def save(self, path: Path) -> None:
        doc = {f"in:{k}": v for k, v in self.inputs.items()}
        doc.update({f"ref:{k}": v for k, v in self.reference.items()})
        doc.update({f"exp:{k}": v for k, v in self.expected.items()})
        buf = io.BytesIO()
        np.savez(buf, **doc)  # type: ignore[arg-type]  # uncompressed: deterministic bytes for a deterministic tar
        path.write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> GoldenSet:
        with np.load(path, allow_pickle=False) as npz:
            inputs: Arrays = {}
            ref: Arrays = {}
            exp: Arrays = {}
            for key in npz.files:
                kind, _, name = key.partition(":")
                {"in": inputs, "ref": ref, "exp": exp}.get(kind, {})[name] = npz[key]
        if not inputs or not ref or set(ref) != set(exp):
            raise ValueError("golden.npz lacks inputs, reference or expected outputs")
        return cls(inputs, ref, exp)


@dataclass
class SelfTestResult:
    ok: bool
    max_abs_diff: dict[str, float]
    top1_agreement: float | None
    reason: str = ""


def self_test(session: InferenceSession, golden: GoldenSet, spec: Golden, classification: bool) -> SelfTestResult:
    """Run the golden inputs and compare; never raises for a numeric mismatch, only reports it."""
    try:
        got = session.infer(golden.inputs)
    except Exception as exc:
        return SelfTestResult(False, {}, None, f"inference failed: {type(exc).__name__}: {exc}")
    diffs: dict[str, float] = {}
    bad = []
    for name, exp in golden.expected.items():
        out = got.get(name)
        if out is None or out.shape != exp.shape:
            return SelfTestResult(False, diffs, None, f"output {name}: missing or wrong shape")
        out64 = np.asarray(out, dtype=np.float64)
        exp64 = np.asarray(exp, dtype=np.float64)
        if not np.all(np.isfinite(out64)):
            return SelfTestResult(False, diffs, None, f"output {name}: non-finite values")
        diffs[name] = float(np.max(np.abs(out64 - exp64), initial=0.0))
        if not np.all(np.abs(out64 - exp64) <= spec.atol + spec.rtol * np.abs(exp64)):
            bad.append(f"{name}: max |diff| {diffs[name]:.3g} > atol {spec.atol:.3g}")
    agreement = None
    if classification:
        name = next(iter(golden.reference))
        agreement = float(np.mean(np.argmax(got[name], -1) == np.argmax(golden.reference[name], -1)))
        if spec.min_top1_agreement is not None and agreement < spec.min_top1_agreement:
            bad.append(f"top-1 agreement {agreement:.3f} < {spec.min_top1_agreement:.3f}")
    return SelfTestResult(not bad, diffs, agreement, "; ".join(bad))
