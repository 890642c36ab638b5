"""Speed and memory of one onnxruntime-genai model in a fresh process, through the agent's own
adapter (what a device runs): load time, TTFT and decode tokens/s (medians over runs after a
warm-up), and the process's peak RSS. Prints one JSON object.

    python -m builder.llm.probe MODEL_DIR --threads 2 --prompt-ids '[1, 2, 3]' --tokens 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import ModelError


def measure(
    folder: Path, threads: int, prompt_ids: list[int], tokens: int, runs: int
) -> dict[str, Any]:
    from agent.runtime.textgen import GenParams, load_generator

    t0 = time.perf_counter()
    gen = load_generator(folder, threads=threads)
    load_s = time.perf_counter() - t0
    params = GenParams(max_new_tokens=tokens)
    ttfts: list[float] = []
    rates: list[float] = []
    for i in range(runs + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        first = 0.0
        n = 0
        for _ in gen.generate(prompt_ids, params):
            n += 1
            if n == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        if i and n:
            ttfts.append((first - t0) * 1000.0)
            if n > 1:
                rates.append((n - 1) / (end - first))
    gen.close()
    if not ttfts:
        raise ModelError(f"{folder}: the model produced no tokens")
    return {
        "load_s": round(load_s, 3),
        "ttft_ms": round(statistics.median(ttfts), 2),
        "decode_tok_s": round(statistics.median(rates), 2) if rates else 0.0,
        "peak_rss_mb": round(peak_rss_kb() / 1024.0, 1),
        "runs": len(ttfts),
    }


def peak_rss_kb() -> int:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss on Linux) starts afresh at exec
    and so does not inherit the high-water mark of the builder that started this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def probe(
    folder: Path, threads: int, prompt_ids: list[int], tokens: int, runs: int
) -> dict[str, Any]:
    """``measure`` in a child process, so the peak RSS is the model's alone."""
    args = [
        sys.executable,
        "-m",
        "builder.llm.probe",
        str(folder),
        "--threads",
        str(threads),
        "--prompt-ids",
        json.dumps(prompt_ids),
        "--tokens",
        str(tokens),
        "--runs",
        str(runs),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"{folder.name}: speed probe failed: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-ids", required=True, help="JSON list of prompt token ids")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(measure(a.folder, a.threads, json.loads(a.prompt_ids), a.tokens, a.runs)))


if __name__ == "__main__":
    main()
