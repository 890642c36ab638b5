"""Golden vectors (golden.npz in the artifact) and the self-test that checks a runtime with them.

golden.npz holds one or more *cases*, each one inference: its inputs, the fp32 reference
outputs and this candidate's outputs on the build host. Two layouts, both readable:

  * batched (the first format): ``in:NAME``, ``ref:NAME``, ``exp:NAME``: one case whose inputs
    stack every sample on axis 0, so ``v[:1]`` of each input is a batch-1 feed;
  * per case: ``in.K:NAME``, ``ref.K:NAME``, ``exp.K:NAME`` for K = 0, 1, ...: each case is fed
    as it is (batch 1, its own sequence length, scalar inputs, state tensors with the batch on
    any axis). The benchmark times case 0.

The self-test runs every case on the device and requires:
  * integer and bool outputs equal to the expected ones, and
    |device - expected| <= atol + rtol * |expected| for every float output element (the runtime
    behaves as it did on the build host), and
  * for classifiers, top-1 agreement with the fp32 reference >= min_top1_agreement.
Files are written deflated (np.load reads stored and deflated members alike).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.protocol.manifest import Golden
from agent.runtime.base import InferenceSession

Arrays = dict[str, npt.NDArray[np.generic]]
_KINDS = ("in", "ref", "exp")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same arrays make the same bytes


@dataclass
class GoldenCase:
    """One inference: its inputs, the fp32 reference outputs and the expected outputs."""

    inputs: Arrays
    reference: Arrays
    expected: Arrays


@dataclass
class GoldenSet:
    """``inputs``/``reference``/``expected`` are the first case; ``more`` holds the others.

    ``batched``: the first layout, one case whose inputs stack the samples on axis 0.
    """

    inputs: Arrays
    reference: Arrays
    expected: Arrays
    more: list[GoldenCase] = field(default_factory=list)
    batched: bool = True

    @classmethod
    def of_cases(cls, cases: list[GoldenCase]) -> GoldenSet:
        """A set of cases each fed as it is (the per-case layout)."""
        if not cases:
            raise ValueError("a golden set needs at least one case")
        first = cases[0]
        return cls(first.inputs, first.reference, first.expected, list(cases[1:]), batched=False)

    @property
    def cases(self) -> list[GoldenCase]:
        return [GoldenCase(self.inputs, self.reference, self.expected), *self.more]

    def bench_feed(self) -> Arrays:
        """A batch-1 feed: the first sample of a batched set, else the first case as it is."""
        if not self.batched:
            return self.inputs
        return {k: v[:1] if v.ndim else v for k, v in self.inputs.items()}

    def save(self, path: Path) -> None:
        doc: Arrays = {}
        for k, case in enumerate(self.cases):
            tag = "" if self.batched else f".{k}"
            for kind, arrays in zip(
                _KINDS, (case.inputs, case.reference, case.expected), strict=True
            ):
                doc.update({f"{kind}{tag}:{name}": v for name, v in arrays.items()})
        if self.batched and self.more:
            raise ValueError("a batched golden set has exactly one case")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, value in doc.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> GoldenSet:
        cases: dict[int, tuple[Arrays, Arrays, Arrays]] = {}
        batched = False
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                prefix, _, name = key.partition(":")
                kind, dot, index = prefix.partition(".")
                if kind not in _KINDS or (dot and not index.isdigit()):
                    continue  # a later writer's extra entry
                batched = batched or not dot
                k = int(index) if dot else 0
                cases.setdefault(k, ({}, {}, {}))[_KINDS.index(kind)][name] = npz[key]
        if not cases or (batched and len(cases) > 1) or sorted(cases) != list(range(len(cases))):
            raise ValueError("golden.npz mixes layouts or skips a case number")
        for k in sorted(cases):
            inputs, ref, exp = cases[k]
            if not inputs or not ref or set(ref) != set(exp):
                raise ValueError(f"golden.npz case {k} lacks inputs, reference or expected outputs")
        first, *rest = (GoldenCase(*cases[k]) for k in sorted(cases))
        return cls(first.inputs, first.reference, first.expected, rest, batched=batched)


@dataclass
class SelfTestResult:
    ok: bool
    max_abs_diff: dict[str, float]
    top1_agreement: float | None
    reason: str = ""


def _exact(dtype: np.dtype[np.generic]) -> bool:
    return dtype.kind in "biu"


class _Unusable(Exception):
    """An output that cannot be compared at all (shape, dtype, non-finite)."""


def _compare(
    name: str,
    out: npt.NDArray[np.generic],
    exp: npt.NDArray[np.generic],
    spec: Golden,
    diffs: dict[str, float],
) -> str | None:
    """None when ``out`` matches ``exp``, else why not; records the max |diff| of ``name``."""
    if out.shape != exp.shape:
        raise _Unusable(f"output {name}: wrong shape {list(out.shape)}, expected {list(exp.shape)}")
    if _exact(exp.dtype):
        if not _exact(out.dtype):
            raise _Unusable(f"output {name}: dtype {out.dtype.name}, expected {exp.dtype.name}")
        # int64 in float64 loses precision past 2**53: compare as integers
        wrong = int(np.count_nonzero(out.astype(np.int64) != exp.astype(np.int64)))
        d = np.abs(out.astype(np.int64) - exp.astype(np.int64))
        diffs[name] = max(diffs.get(name, 0.0), float(np.max(d, initial=0)))
        return (
            None
            if wrong == 0
            else f"{name}: {wrong} of {exp.size} values differ (exact match needed)"
        )
    out64 = np.asarray(out, dtype=np.float64)
    exp64 = np.asarray(exp, dtype=np.float64)
    if not np.all(np.isfinite(out64)):
        raise _Unusable(f"output {name}: non-finite values")
    err = np.abs(out64 - exp64)
    diffs[name] = max(diffs.get(name, 0.0), float(np.max(err, initial=0.0)))
    if not np.all(err <= spec.atol + spec.rtol * np.abs(exp64)):
        return f"{name}: max |diff| {float(np.max(err)):.3g} > atol {spec.atol:.3g}"
    return None


def self_test(
    session: InferenceSession, golden: GoldenSet, spec: Golden, classification: bool
) -> SelfTestResult:
    """Run every golden case and compare; never raises for a mismatch, only reports it."""
    diffs: dict[str, float] = {}
    bad: list[str] = []
    hits = total = 0
    cases = golden.cases
    for k, case in enumerate(cases):
        where = f" (golden case {k})" if len(cases) > 1 else ""
        try:
            got = session.infer(case.inputs)
        except Exception as exc:
            return SelfTestResult(
                False, diffs, None, f"inference failed{where}: {type(exc).__name__}: {exc}"
            )
        for name, exp in case.expected.items():
            out = got.get(name)
            if out is None:
                return SelfTestResult(False, diffs, None, f"output {name}: missing{where}")
            try:
                problem = _compare(name, np.asarray(out), np.asarray(exp), spec, diffs)
            except _Unusable as exc:
                return SelfTestResult(False, diffs, None, f"{exc}{where}")
            if problem is not None:
                bad.append(problem + where)
        if classification:
            name = next(iter(case.reference))
            ref = np.asarray(case.reference[name])
            same = np.argmax(np.asarray(got[name]), -1) == np.argmax(ref, -1)
            hits, total = hits + int(np.sum(same)), total + int(np.size(same))
    agreement = None
    if classification and total:
        agreement = hits / total
        if spec.min_top1_agreement is not None and agreement < spec.min_top1_agreement:
            bad.append(f"top-1 agreement {agreement:.3f} < {spec.min_top1_agreement:.3f}")
    return SelfTestResult(not bad, diffs, agreement, "; ".join(bad))
