"""Benchmark: the budget-driven search on every profile, TFLite int8 vs fp32, teacher vs student.

Builds the digits example (examples/digits) for every shipped device profile through the
builder's own code path (builder.search.Builder, the profiles' real candidates and budgets),
then measures side by side, in one run:

* TFLite fp32 against TFLite full int8 (the rpi4 profile's tflite_fp32 and tflite_int8
  candidates): artifact size, top-1 on the eval set, and p95 at batch 1 with ai-edge-litert,
  both interpreters loaded at once and timed in interleaved rounds;
* the teacher (the digits CNN) against the distilled student (the distill step of the
  distilled_* recipes): parameters, top-1, and torch p95 at batch 1, interleaved.

Human-readable figures go to stdout as they are measured; the last line is one JSON object.
Run from the repository root:  python3 bench/builder_search.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from builder_digits import interleaved_p95, lat_table  # noqa: E402

EXAMPLE = ROOT / "examples" / "digits"

TARGETS = {
    "tflite_int8_size_ratio": ("<=", 0.35),
    "tflite_int8_top1_drop_pt": ("<=", 1.0),
    "tflite_int8_p95_ratio": ("<=", 0.6),
    "student_param_ratio": ("<=", 0.5),
    "student_top1_drop_pt": ("<=", 1.5),
}


def say(msg: str) -> None:
    print(msg, flush=True)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class TorchSession:
    """A torch module behind the InferenceSession call shape, for the interleaved timer."""

    def __init__(self, module: Any) -> None:
        self.module = module.eval()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            return {"logits": self.module(torch.from_numpy(next(iter(feeds.values())))).numpy()}


def model_of(builder: Any, profile: Any, recipe: str) -> Any:
    """The model a candidate was packed from, and its distill step's output: from the cache."""
    from builder.pipeline import plan

    src = builder.source()
    steps = builder._steps(recipe, profile, False)
    run = builder.pipeline.run(src, plan(steps, src.kind, recipe))
    if not all(s.cached for s in run.steps):
        raise RuntimeError(f"{recipe}: expected every step to come from the build's cache")
    return run.model


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rounds", type=int, default=10, help="interleaved latency rounds (default 10)"
    )
    ap.add_argument(
        "--iters", type=int, default=200, help="calls per model per round (default 200)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="LiteRT threads (default: rpi4's, capped at the CPUs here)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary build directory")
    args = ap.parse_args()

    from agent.protocol.profile import load_profiles
    from agent.protocol.signing import load_private_key
    from agent.runtime import load_session
    from builder.config import load_build_config
    from builder.search import Builder
    from examples.digits.prepare import prepare

    load0 = os.getloadavg()[0]
    prepare(quiet=False)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-search-"))
    try:
        cfg = load_build_config(EXAMPLE / "edgefleet.toml")
        key = load_private_key(cfg.resolve(cfg.signing_key or "work/keys/edgefleet.key"))
        builder = Builder(cfg, key, tmp / "cache", progress=log)
        profiles = load_profiles(ROOT / "device_profiles")
        t0 = time.perf_counter()
        results = {name: builder.build_profile(p, tmp / "out") for name, p in profiles.items()}
        build_s = time.perf_counter() - t0

        say(f"build of every profile: {build_s:.1f} s")
        say(
            f"  {'profile':<18}{'runtime':<13}{'chosen':<24}{'size KB':>9}{'top-1':>8}{'p95 ms':>9}"
        )
        for name, r in results.items():
            c = r.chosen
            if c is None:
                say(f"  {name:<18}{r.profile.runtime.name:<13}NOTHING FITS")
                continue
            m = c.metrics
            say(
                f"  {name:<18}{c.runtime:<13}{c.recipe:<24}{m['artifact_bytes'] / 1024:>9.1f}"
                f"{m.get('top1', float('nan')) * 100:>8.2f}{m['latency_b1']['p95_ms']:>9.3f}"
            )
        fitted = sorted(n for n, r in results.items() if r.artifact is not None)

        # TFLite fp32 vs full int8 (rpi4 candidates), side by side.
        rpi = results["rpi4"]
        by = {c.recipe: c for c in rpi.candidates}
        f32, i8 = by["tflite_fp32"], by["tflite_int8"]
        for c in (f32, i8):
            if not c.metrics:
                raise RuntimeError(f"rpi4/{c.recipe} was not built: {c.error}")
        threads = args.threads or min(rpi.profile.runtime.threads, os.cpu_count() or 1)
        paths = {r: model_of(builder, rpi.profile, r).path for r in ("tflite_fp32", "tflite_int8")}
        x1 = builder.data.eval.x[:1]
        sessions = {r: load_session("litert", p, threads=threads) for r, p in paths.items()}
        if threads != 1:  # one thread too, in the same rounds: a tiny model gains nothing from more
            sessions.update(
                {f"{r}_1t": load_session("litert", p, threads=1) for r, p in paths.items()}
            )
        lat = interleaved_p95(sessions, {"input": x1}, rounds=args.rounds, iters=args.iters)
        lat_table(
            f"TFLite at batch 1, ai-edge-litert, {threads} thread(s) (_1t: 1 thread), interleaved",
            lat,
            "tflite_fp32",
        )
        size_ratio = i8.metrics["artifact_bytes"] / f32.metrics["artifact_bytes"]
        top1_drop = (f32.metrics["top1"] - i8.metrics["top1"]) * 100
        say(
            f"  size: fp32 {f32.metrics['artifact_bytes'] / 1024:.1f} KB, int8 {i8.metrics['artifact_bytes'] / 1024:.1f} KB "
            f"(x{size_ratio:.3f}); top-1 fp32 {f32.metrics['top1'] * 100:.2f}%, int8 {i8.metrics['top1'] * 100:.2f}%"
        )

        # Teacher vs distilled student (torch), side by side.
        student_handle = model_of(builder, rpi.profile, "distilled_tflite_int8")
        d = student_handle.notes["distill"]
        from builder.pipeline import plan

        src = builder.source()
        distill_step = [
            s
            for s in builder._steps("distilled_tflite_int8", rpi.profile, False)
            if s[0] == "distill"
        ]
        student = builder.pipeline.run(src, plan(distill_step, src.kind, "distill")).model.module
        tlat = interleaved_p95(
            {"teacher": TorchSession(src.module), "student": TorchSession(student)},
            {"input": x1},
            rounds=args.rounds,
            iters=args.iters,
        )
        lat_table("teacher vs distilled student, torch, batch 1, interleaved", tlat, "teacher")
        say(
            f"  params: teacher {d['teacher_params']}, student {d['student_params']} (x{d['param_ratio']:.3f}); "
            f"top-1 teacher {d['teacher_top1'] * 100:.2f}%, student {d['student_top1'] * 100:.2f}%"
        )

        out: dict[str, Any] = {
            "tflite_int8_size_ratio": round(size_ratio, 4),
            "tflite_int8_top1_drop_pt": round(top1_drop, 3),
            "tflite_int8_p95_ratio": round(
                lat["tflite_int8"]["p95_ms"] / lat["tflite_fp32"]["p95_ms"], 4
            ),
            "tflite_int8_p50_ratio": round(
                lat["tflite_int8"]["p50_ms"] / lat["tflite_fp32"]["p50_ms"], 4
            ),
            **(
                {
                    "tflite_int8_p95_ratio_1t": round(
                        lat["tflite_int8_1t"]["p95_ms"] / lat["tflite_fp32_1t"]["p95_ms"], 4
                    )
                }
                if "tflite_int8_1t" in lat
                else {}
            ),
            "student_param_ratio": round(d["param_ratio"], 4),
            "student_top1_drop_pt": round((d["teacher_top1"] - d["student_top1"]) * 100, 3),
            "student_p95_ratio": round(tlat["student"]["p95_ms"] / tlat["teacher"]["p95_ms"], 4),
            "profiles_fitted": f"{len(fitted)}/{len(profiles)}",
            "profiles": {n: (r.chosen.recipe if r.chosen else None) for n, r in results.items()},
            "p95_ms": {
                **{k: v["p95_ms"] for k, v in lat.items()},
                **{k: v["p95_ms"] for k, v in tlat.items()},
            },
            "tflite_threads": threads,
            "build_seconds": round(build_s, 1),
        }
        met = {k: (out[k] <= lim) for k, (_, lim) in TARGETS.items()}
        met["profiles_fitted"] = len(fitted) == len(profiles)
        out["targets_met"] = met
        out["all_targets_met"] = all(met.values())
        out["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        for s in sessions.values():
            s.close()
        print(json.dumps(out), flush=True)
        return 0
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
