"""Benchmark: what int8 quantization and structured pruning buy on the x86-ipc profile.

Builds the digits example (examples/digits) for the x86-ipc device profile through the
builder's own code path (builder.search.Builder) with the candidates fp32, int8_static and
pruned_int8_static, then measures side by side, in one run:

* artifact size and top-1 of every candidate (from the candidates' metrics, i.e. what the
  build writes into each manifest);
* host p95 latency at batch 1 and batch 64 of the candidates' model files, all sessions
  loaded at once and measured in interleaved rounds (the order rotates each round), so that
  noise on a shared machine hits every model alike;
* a MobileNetV2-style network (examples/digits/model.py:build_mobilenetv2, 1x3x160x160),
  exported and quantized with the same passes (export_onnx -> simplify -> quantize static
  QDQ per-channel, calibrated on synthetic inputs), fp32 vs int8 p95 at batch 1, because the
  digits net is so small that its batch-1 latency is mostly per-call overhead.

Human-readable figures go to stdout as they are measured; the last line is one JSON object.
Run from the repository root:  python3 bench/builder_digits.py
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXAMPLE = ROOT / "examples" / "digits"
PROFILE = "x86-ipc"
RECIPES = ("fp32", "int8_static", "pruned_int8_static")
MNV2_SHAPE = (3, 160, 160)

TARGETS = {
    # key: (comparison, limit)
    "int8_size_ratio": ("<=", 0.4),
    "int8_top1_drop_pt": ("<=", 1.0),
    "int8_p95_ratio_b64": ("<=", 0.8),
    "mnv2_int8_p95_ratio_b1": ("<=", 0.5),
    "pruned_param_ratio": ("<=", 0.5),
    "pruned_top1_drop_pt": ("<=", 1.0),
}


def say(msg: str) -> None:
    print(msg, flush=True)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ latency, interleaved


def interleaved_p95(
    sessions: dict[str, Any],
    feeds: dict[str, np.ndarray],
    *,
    rounds: int,
    iters: int,
    warmup: int = 10,
    max_block_s: float = 4.0,
) -> dict[str, dict[str, float]]:
    """Latency of every session on the same input, measured in alternating rounds.

    Each round runs every session for ``iters`` calls (or ``max_block_s``, at least 5 calls);
    the order of the sessions rotates from round to round. Percentiles are over all samples.
    """
    from builder.evaluate.latency import percentiles

    names = list(sessions)
    for n in names:
        for _ in range(warmup):
            sessions[n].infer(feeds)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            s, out = sessions[n], samples[n]
            deadline = time.perf_counter() + max_block_s
            done = 0
            while done < iters and (done < 5 or time.perf_counter() < deadline):
                t0 = time.perf_counter()
                s.infer(feeds)
                out.append(time.perf_counter() - t0)
                done += 1
    return {n: percentiles(v) for n, v in samples.items()}


def lat_table(title: str, lat: dict[str, dict[str, float]], base: str) -> None:
    say(f"\n{title}")
    say(f"  {'model':<22}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'n':>6}{'p95 / ' + base:>16}")
    for n, v in lat.items():
        say(
            f"  {n:<22}{v['p50_ms']:>10.4f}{v['p95_ms']:>10.4f}{v['p99_ms']:>10.4f}{v['n']:>6}"
            f"{v['p95_ms'] / lat[base]['p95_ms']:>16.3f}"
        )


class _NoSpinSession:
    """Diagnostic only: the agent's onnxruntime session options plus allow_spinning=0."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.log_severity_level = 3
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        self._out = [x.name for x in self._s.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._out, self._s.run(self._out, feeds), strict=True))

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ digits build


def build_digits(tmp: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Build the digits example for x86-ipc with the three recipes; returns what was built."""
    from agent.protocol.profile import DeviceProfile, get_profile
    from agent.protocol.signing import load_private_key
    from builder.config import load_build_config
    from builder.search import Builder
    from examples.digits.prepare import prepare

    prepare(quiet=False)
    cfg = load_build_config(EXAMPLE / "edgefleet.toml")
    base = get_profile(PROFILE, ROOT / "device_profiles")
    doc = base.model_dump(mode="json")
    doc["build"]["candidates"] = list(RECIPES)
    # Generous budgets: every candidate is measured and packaged, none is gated out.
    doc["budgets"].update(
        max_artifact_kb=1e9, max_accuracy_drop_pt=100.0, max_p95_ms=1e6, max_ram_mb=1e6
    )
    profile = DeviceProfile.model_validate(doc)
    key = load_private_key(cfg.resolve(cfg.signing_key or "work/keys/edgefleet.key"))
    builder = Builder(cfg, key, tmp / "cache", progress=log)
    t0 = time.perf_counter()
    result = builder.build_profile(profile, tmp / "out")
    build_s = time.perf_counter() - t0
    return builder, profile, result, {"build_seconds": round(build_s, 1)}


def candidate_model_path(builder: Any, profile: Any, recipe: str) -> Path:
    """The model file a candidate was packed from: re-planning its recipe hits the pass cache.

    (The staged artifacts are deleted when build_profile returns; the model files stay in
    the builder's cache directory and are byte-identical to the model inside the artifact.)
    """
    from builder.pipeline import plan
    from builder.recipes import recipe_steps

    src = builder.source()
    custom = getattr(builder, "custom_recipes", None)  # recipes defined in the build config
    steps = (
        recipe_steps(recipe, profile, False, custom)
        if custom
        else recipe_steps(recipe, profile, False)
    )
    run = builder.pipeline.run(src, plan(steps, src.kind, recipe))
    if not all(s.cached for s in run.steps):
        raise RuntimeError(f"{recipe}: expected every step to come from the build's cache")
    assert run.model.path is not None
    return Path(run.model.path)


# ------------------------------------------------------------------ MobileNetV2


def build_mnv2(tmp: Path, calib_n: int, quant: dict[str, Any]) -> tuple[Path, Path, dict[str, Any]]:
    """fp32 (export -> simplify) and int8 (-> quantize) ONNX files of the MobileNetV2 net."""
    from builder.data import DataBundle, Split
    from builder.passes import PassContext
    from builder.pipeline import Pipeline, plan

    rng = np.random.default_rng(0)
    # Synthetic "images": per-channel normalised noise, smoothed a little so activations vary
    # the way they do on natural images rather than as white noise.
    x = rng.standard_normal((calib_n, *MNV2_SHAPE)).astype(np.float32)
    x = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3) + np.roll(x, (1, 1), axis=(2, 3))) / 2.0
    data = DataBundle(eval=Split(x[:8], None, "synthetic"), calibration=Split(x, None, "synthetic"))
    pipe = Pipeline(
        tmp / "mnv2-cache",
        lambda wd: PassContext(workdir=wd, data=data, task="regression", progress=log),
    )
    load: tuple[str, dict[str, Any]] = (
        "load",
        {
            "factory": "model.py:build_mobilenetv2",
            "input_shape": list(MNV2_SHAPE),
            "base_dir": str(EXAMPLE),
        },
    )
    fp32_steps: list[tuple[str, dict[str, Any]]] = [
        load,
        ("export_onnx", {"parity_samples": 4}),
        ("simplify", {}),
    ]
    t0 = time.perf_counter()
    fp32 = pipe.run(None, plan(fp32_steps, None, "mnv2 fp32")).model
    int8 = pipe.run(
        None, plan([*fp32_steps, ("quantize", dict(quant, mode="static"))], None, "mnv2 int8")
    ).model
    assert fp32.path is not None and int8.path is not None
    info = {
        "mnv2_build_seconds": round(time.perf_counter() - t0, 1),
        "mnv2_fp32_bytes": fp32.path.stat().st_size,
        "mnv2_int8_bytes": int8.path.stat().st_size,
        "mnv2_params": int(fp32.notes.get("params", 0)),
        "mnv2_quantize": dict(quant, mode="static"),
    }
    return fp32.path, int8.path, info


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds per comparison (default 10)"
    )
    ap.add_argument(
        "--iters-b1", type=int, default=200, help="calls per model per round at batch 1"
    )
    ap.add_argument(
        "--iters-b64", type=int, default=40, help="calls per model per round at batch 64"
    )
    ap.add_argument(
        "--iters-mnv2", type=int, default=25, help="MobileNetV2 calls per model per round"
    )
    ap.add_argument("--calib", type=int, default=32, help="MobileNetV2 calibration inputs")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary directory and print its path"
    )
    args = ap.parse_args(argv)

    from agent.runtime import load_session

    t_start = time.perf_counter()
    load0 = round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    try:
        builder, profile, result, extra = build_digits(tmp)
        threads = profile.runtime.threads
        cands = {c.recipe: c for c in result.candidates}
        failed = {r: c.error for r, c in cands.items() if c.error}
        if failed:
            raise SystemExit(f"candidates failed: {failed}")
        fp, q, pr = (
            cands["fp32"].metrics,
            cands["int8_static"].metrics,
            cands["pruned_int8_static"].metrics,
        )
        notes = cands["pruned_int8_static"].notes

        say(
            f"\ndigits on {PROFILE} (onnxruntime, {threads} threads), build {extra['build_seconds']} s"
        )
        say(
            f"  {'candidate':<22}{'artifact':>12}{'model':>12}{'params':>10}{'top-1':>9}{'drop pt':>9}{'build p95':>11}"
        )
        for r in RECIPES:
            m = cands[r].metrics
            say(
                f"  {r:<22}{m['artifact_bytes']:>12,}{m['model_bytes']:>12,}{m.get('params', 0):>10,}"
                f"{m['top1'] * 100:>8.2f}%{m['top1_drop_pt']:>9.2f}{m['latency_b1']['p95_ms']:>9.3f}ms"
            )

        paths = {r: candidate_model_path(builder, profile, r) for r in RECIPES}
        for r in RECIPES:  # the files measured are the ones that were packed
            if paths[r].stat().st_size != cands[r].metrics["model_bytes"]:
                raise RuntimeError(f"{r}: cached model differs in size from the packed one")
        ev = np.load(EXAMPLE / "work" / "eval.npz")["x"].astype(np.float32)
        name = builder.source().input_name
        sessions = {r: load_session("onnxruntime", paths[r], threads=threads) for r in RECIPES}
        log("latency, digits, batch 1")
        b1 = interleaved_p95(
            sessions, {name: np.ascontiguousarray(ev[:1])}, rounds=args.rounds, iters=args.iters_b1
        )
        lat_table("digits latency, batch 1 (interleaved)", b1, "fp32")
        log("latency, digits, batch 64")
        b64 = interleaved_p95(
            sessions,
            {name: np.ascontiguousarray(ev[:64])},
            rounds=args.rounds,
            iters=args.iters_b64,
        )
        lat_table("digits latency, batch 64 (interleaved)", b64, "fp32")
        for s in sessions.values():
            s.close()

        log("MobileNetV2: export, simplify, quantize")
        quant = {"per_channel": True, "activation_type": "uint8", "calibration_samples": args.calib}
        mf, mq, minfo = build_mnv2(tmp, args.calib, quant)
        xm = {
            "input": np.random.default_rng(1).standard_normal((1, *MNV2_SHAPE)).astype(np.float32)
        }
        shape = "x".join(map(str, MNV2_SHAPE))
        mlat: dict[int | str, dict[str, dict[str, float]]] = {}
        # Headline: the profile's threads, sessions as the agent loads them. Then two
        # diagnostics on the same files: 1 thread, and the profile's threads with the intra-op
        # thread pool not spinning (a session option the agent's adapter does not set).
        variants: list[tuple[int | str, Any]] = [
            (threads, lambda p: load_session("onnxruntime", p, threads=threads))
        ]
        if threads != 1:
            variants.append((1, lambda p: load_session("onnxruntime", p, threads=1)))
        variants.append(("nospin", lambda p: _NoSpinSession(p, threads)))
        for label, loader in variants:
            msess = {"mnv2_fp32": loader(mf), "mnv2_int8_static": loader(mq)}
            log(f"latency, MobileNetV2, batch 1, {label}")
            mlat[label] = interleaved_p95(
                msess, xm, rounds=args.rounds, iters=args.iters_mnv2, warmup=5
            )
            what = (
                f"{label} thread(s)"
                if isinstance(label, int)
                else f"{threads} threads, no spinning (diagnostic)"
            )
            lat_table(
                f"MobileNetV2 1x{shape} latency, batch 1, {what} (interleaved)",
                mlat[label],
                "mnv2_fp32",
            )
            for s in msess.values():
                s.close()
        say(f"  sizes: fp32 {minfo['mnv2_fp32_bytes']:,} B, int8 {minfo['mnv2_int8_bytes']:,} B")

        def ratio(a: float, b: float) -> float:
            return round(a / b, 4)

        res: dict[str, Any] = {
            "bench": "builder_digits",
            "profile": PROFILE,
            "threads": threads,
            "cpu_count": os.cpu_count(),
            "int8_size_ratio": ratio(q["artifact_bytes"], fp["artifact_bytes"]),
            "int8_model_size_ratio": ratio(q["model_bytes"], fp["model_bytes"]),
            "int8_top1_drop_pt": q["top1_drop_pt"],
            "int8_p95_ratio_b1": ratio(b1["int8_static"]["p95_ms"], b1["fp32"]["p95_ms"]),
            "int8_p95_ratio_b64": ratio(b64["int8_static"]["p95_ms"], b64["fp32"]["p95_ms"]),
            "pruned_param_ratio": ratio(notes["params_after"], notes["params_before"]),
            # pruned = the pruned_int8_static candidate (50% structured pruning, fine-tuned, int8)
            "pruned_p95_ratio": ratio(b1["pruned_int8_static"]["p95_ms"], b1["fp32"]["p95_ms"]),
            "pruned_p95_ratio_b64": ratio(
                b64["pruned_int8_static"]["p95_ms"], b64["fp32"]["p95_ms"]
            ),
            "pruned_vs_int8_p95_ratio_b64": ratio(
                b64["pruned_int8_static"]["p95_ms"], b64["int8_static"]["p95_ms"]
            ),
            "pruned_top1_drop_pt": pr["top1_drop_pt"],
            "pruned_size_ratio": ratio(pr["artifact_bytes"], fp["artifact_bytes"]),
            "pruned_finetune": notes.get("finetune"),
            "mnv2_int8_p95_ratio_b1": ratio(
                mlat[threads]["mnv2_int8_static"]["p95_ms"], mlat[threads]["mnv2_fp32"]["p95_ms"]
            ),
            "mnv2_int8_p50_ratio_b1": ratio(
                mlat[threads]["mnv2_int8_static"]["p50_ms"], mlat[threads]["mnv2_fp32"]["p50_ms"]
            ),
            "mnv2_diagnostics": {
                f"p95_ratio_b1_{k}": ratio(
                    v["mnv2_int8_static"]["p95_ms"], v["mnv2_fp32"]["p95_ms"]
                )
                for k, v in mlat.items()
                if k != threads
            }
            | {
                f"p50_ratio_b1_{k}": ratio(
                    v["mnv2_int8_static"]["p50_ms"], v["mnv2_fp32"]["p50_ms"]
                )
                for k, v in mlat.items()
                if k != threads
            },
            "int8_p50_ratio_b1": ratio(b1["int8_static"]["p50_ms"], b1["fp32"]["p50_ms"]),
            "int8_p50_ratio_b64": ratio(b64["int8_static"]["p50_ms"], b64["fp32"]["p50_ms"]),
            "fp32_top1": fp["top1"],
            "p95_ms": {
                "b1": {k: v["p95_ms"] for k, v in b1.items()},
                "b64": {k: v["p95_ms"] for k, v in b64.items()},
                **{
                    f"mnv2_b1_{k}": {n: v["p95_ms"] for n, v in lat.items()}
                    for k, lat in mlat.items()
                },
            },
            "artifact_bytes": {r: cands[r].metrics["artifact_bytes"] for r in RECIPES},
            "rounds": args.rounds,
            "loadavg_1m": {"start": load0, "end": round(os.getloadavg()[0], 2)},
            **extra,
            **minfo,
        }
        met = {}
        for k, (op, lim) in TARGETS.items():
            met[k] = bool(res[k] <= lim) if op == "<=" else bool(res[k] >= lim)
        res["targets"] = {k: f"{op} {lim}" for k, (op, lim) in TARGETS.items()}
        res["targets_met"] = met
        res["all_targets_met"] = all(met.values())
        res["seconds"] = round(time.perf_counter() - t_start, 1)

        say("\ntargets")
        for k, (op, lim) in TARGETS.items():
            say(f"  {k:<26}{res[k]:>10.4f}  {op} {lim:<5} {'ok' if met[k] else 'MISSED'}")
        say(
            f"  int8_p95_ratio_b1 (no target) {res['int8_p95_ratio_b1']:.4f}; "
            f"pruned_p95_ratio (pruned int8 / fp32, batch 1) {res['pruned_p95_ratio']:.4f}"
        )
        if args.keep:
            say(f"kept: {tmp}")
        print(json.dumps(res, default=str), flush=True)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
