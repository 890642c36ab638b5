"""Peak RSS of loading and running a model, measured in a fresh child process.

The child imports only the agent's runtime (as a device would), records its RSS before
loading, loads the model, runs it on a real batch-1 feed, and reports its peak: the figure
compared with the profile's max_ram_mb is that peak of a process doing nothing but serving
the model. VmHWM is read rather than ru_maxrss, which Linux carries over from the (large)
builder process across fork+exec.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError

_CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from agent.runtime import load_session
def status_mb(field):
    # VmHWM is per address space, so unlike ru_maxrss it does not inherit the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0
runtime, path, threads, feeds_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with np.load(feeds_path, allow_pickle=False) as z:
    feeds = {k: z[k] for k in z.files}
before = status_mb("VmRSS")
s = load_session(runtime, Path(path), threads=threads)
for _ in range(5):
    s.infer(feeds)
peak = status_mb("VmHWM")
print(json.dumps({"rss_before_load_mb": round(before, 2), "peak_rss_mb": round(peak, 2), "model_rss_mb": round(peak - before, 2)}))
"""


def measure_peak_rss(
    runtime: str, model: Path, threads: int, feeds: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "feeds.npz"
        np.savez(fp, **dict(feeds))  # type: ignore[arg-type]
        cmd = [sys.executable, "-c", _CHILD, runtime, str(model), str(threads), str(fp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"memory probe failed for {model.name}: {tail[0]}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc
