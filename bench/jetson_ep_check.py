"""Check the jetson-orin-nano profile's onnxruntime execution-provider path on this machine.

Verifies and extracts a signed artifact, loads its model through ``agent.runtime.load_session``
with the profile's execution providers (TensorRT, CUDA, CPU: first available wins), reports
which providers the session really uses (and what onnxruntime logged while choosing them),
runs the golden self-test, and measures that session against a CPU-only one at batch 1 and
batch 64 in interleaved rounds. Ends with one line of JSON.

    python3 bench/jetson_ep_check.py --artifact X.efa --key edgefleet.pub

On a machine without a GPU build of onnxruntime the "accelerated" session is the CPU one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.protocol.artifact import extract_verified, verify_artifact  # noqa: E402
from agent.protocol.golden import GoldenSet, self_test  # noqa: E402
from agent.protocol.profile import load_profile  # noqa: E402
from agent.protocol.signing import load_public_key  # noqa: E402
from agent.runtime import load_session  # noqa: E402


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def capture_output(sink: list[str]):  # type: ignore[no-untyped-def]
    """Collect what is written to stdout and stderr at the file-descriptor level (onnxruntime's
    native logger writes to fd 2, its Python fallback notice is a print to stdout), then echo it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        for fd in saved:
            os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sink.extend(ANSI_RE.sub("", line).strip() for line in text.splitlines() if line.strip())
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


def gpu_name() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "none (no nvidia-smi)"
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (
        out.stdout.strip().splitlines()[0]
        if out.stdout.strip()
        else f"unknown ({out.stderr.strip()})"
    )


def batch_feeds(golden: GoldenSet, session: Any, batch: int) -> dict[str, np.ndarray]:
    """Golden inputs tiled/cut along axis 0 to ``batch`` rows, in the dtype the model takes."""
    dtypes = {s.name: s.dtype for s in session.inputs}
    feeds = {}
    for name, arr in golden.inputs.items():
        reps = -(-batch // arr.shape[0])
        x = np.concatenate([arr] * reps, axis=0)[:batch]
        feeds[name] = np.ascontiguousarray(x.astype(dtypes.get(name, str(arr.dtype)), copy=False))
    return feeds


def interleaved(
    sessions: dict[str, Any],
    feeds: dict[str, dict[str, np.ndarray]],
    rounds: int,
    iters: int,
    warmup: int,
) -> dict[str, dict[str, float]]:
    """Per session: p50/p95/mean in ms over all rounds; the order rotates each round."""
    names = list(sessions)
    for n in names:
        for _ in range(warmup):
            sessions[n].infer(feeds[n])
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            s, f, out = sessions[n], feeds[n], samples[n]
            for _ in range(iters):
                t0 = time.perf_counter()
                s.infer(f)
                out.append(time.perf_counter() - t0)
    res = {}
    for n, v in samples.items():
        a = np.asarray(v) * 1e3
        res[n] = {
            "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()),
            "n": int(a.size),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument(
        "--key", type=Path, required=True, action="append", help="trusted public key (repeatable)"
    )
    ap.add_argument(
        "--profile", type=Path, default=ROOT / "device_profiles" / "jetson-orin-nano.toml"
    )
    ap.add_argument(
        "--iters", type=int, default=200, help="timed inferences per session per round at batch 1"
    )
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    t_start = time.perf_counter()
    profile = load_profile(args.profile)
    device = gpu_name()
    print(f"device: {device}")
    print(f"onnxruntime {ort.__version__} ({ort.__file__})")
    available = list(ort.get_available_providers())
    print(f"available providers: {available}")
    print(
        f"profile {profile.name}: threads {profile.runtime.threads}, "
        f"providers {list(profile.runtime.execution_providers)}"
    )

    va = verify_artifact(args.artifact, [load_public_key(k) for k in args.key])
    m = va.manifest
    print(
        f"verified {args.artifact.name}: key {va.key_id}, {m.name} {m.version} {m.profile} "
        f"{m.precision}, task {m.task}"
    )

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jetson-ep-") as tmpd:
        dest = Path(tmpd) / "model"
        extract_verified(va, dest)
        model_path = dest / m.model.file
        golden = GoldenSet.load(dest / m.golden.file)

        ort_log: list[str] = []
        t0 = time.perf_counter()
        with capture_output(ort_log):
            accel = load_session(
                "onnxruntime",
                model_path,
                threads=profile.runtime.threads,
                providers=tuple(profile.runtime.execution_providers),
            )
        load_s = time.perf_counter() - t0
        session_providers = list(getattr(accel, "providers", []))
        print(f"agent session providers: {session_providers} (load {load_s:.2f} s)")
        trt_msgs = [ln for ln in ort_log if "tensorrt" in ln.lower() or "nvinfer" in ln.lower()]
        for ln in trt_msgs:
            print(f"TensorRT message: {ln}")

        cpu = load_session(
            "onnxruntime",
            model_path,
            threads=profile.runtime.threads,
            providers=("CPUExecutionProvider",),
        )
        print(f"model inputs: {[(s.name, s.dtype, s.shape) for s in accel.inputs]}")

        st = self_test(accel, golden, m.golden, classification=m.task == "classification")
        st_max = max(st.max_abs_diff.values(), default=float("nan"))
        print(
            f"self-test on {session_providers[0] if session_providers else '?'}: "
            f"{'ok' if st.ok else 'FAILED'}, max |diff| {st_max:.3g} (atol {m.golden.atol}), "
            f"top-1 agreement {st.top1_agreement} {st.reason}"
        )
        st_cpu = self_test(cpu, golden, m.golden, classification=m.task == "classification")
        print(
            f"self-test on CPU: {'ok' if st_cpu.ok else 'FAILED'}, "
            f"max |diff| {max(st_cpu.max_abs_diff.values(), default=float('nan')):.3g}"
        )

        lat: dict[int, dict[str, dict[str, float]]] = {}
        for batch, iters in ((1, args.iters), (64, max(10, args.iters // 4))):
            try:
                f_acc, f_cpu = batch_feeds(golden, accel, batch), batch_feeds(golden, cpu, batch)
                lat[batch] = interleaved(
                    {"accel": accel, "cpu": cpu},
                    {"accel": f_acc, "cpu": f_cpu},
                    rounds=args.rounds,
                    iters=iters,
                    warmup=max(10, iters // 10),
                )
            except Exception as exc:  # e.g. a model exported with a fixed batch of 1
                print(f"batch {batch}: cannot run ({type(exc).__name__}: {exc})")
                continue
            a, c = lat[batch]["accel"], lat[batch]["cpu"]
            print(
                f"batch {batch:>2}  {'session':<12}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}{'n':>7}"
            )
            for label, v in (
                (session_providers[0] if session_providers else "accel", a),
                ("CPU only", c),
            ):
                print(
                    f"          {label[:22]:<22}{v['p50']:>8.3f}{v['p95']:>10.3f}{v['mean']:>10.3f}{v['n']:>7}"
                )
            print(f"          cpu/accel p50 ratio: {c['p50'] / a['p50']:.2f}")

        def fig(batch: int, who: str, key: str = "p50") -> float | None:
            return round(lat[batch][who][key], 4) if batch in lat else None

        res = {
            "available_providers": available,
            "session_providers": session_providers,
            "tensorrt_available": "TensorrtExecutionProvider" in session_providers,
            "tensorrt_in_build": "TensorrtExecutionProvider" in available,
            "tensorrt_messages": trt_msgs,
            "self_test_ok": st.ok,
            "self_test_max_abs_diff": round(st_max, 6),
            "self_test_top1_agreement": st.top1_agreement,
            "cuda_p50_ms_b1": fig(1, "accel"),
            "cpu_p50_ms_b1": fig(1, "cpu"),
            "cuda_p50_ms_b64": fig(64, "accel"),
            "cpu_p50_ms_b64": fig(64, "cpu"),
            "cuda_p95_ms_b1": fig(1, "accel", "p95"),
            "cpu_p95_ms_b1": fig(1, "cpu", "p95"),
            "cuda_p95_ms_b64": fig(64, "accel", "p95"),
            "cpu_p95_ms_b64": fig(64, "cpu", "p95"),
            "device": device,
            "onnxruntime": ort.__version__,
            "precision": m.precision,
            "session_load_s": round(load_s, 3),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
    print(json.dumps(res))
    return 0 if st.ok else 1


if __name__ == "__main__":
    sys.exit(main())
