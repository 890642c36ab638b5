"""Peak RSS of loading and running a model, measured in a fresh child process.

The child imports only the agent's runtime (as a device would), records its RSS before
loading, loads the model, runs it, and reports ru_maxrss: the figure compared with the
profile's max_ram_mb is that peak of a process doing nothing but serving the model. VmHWM is read rather than
ru_maxrss, which Linux carries over from the (large) builder process across fork+exec.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.errors import ModelError

_CHILD = r"""
import json, sys
import numpy as np
from agent.runtime import load_session
def status_mb(field):
    # VmHWM is per address space, so unlike ru_maxrss it does not inherit the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0
runtime, path, threads, batch, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
before = status_mb("VmRSS")
s = load_session(runtime, __import__("pathlib").Path(path), threads=threads)
x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
for _ in range(5):
    s.infer({s.inputs[0].name: x})
peak = status_mb("VmHWM")
print(json.dumps({"rss_before_load_mb": round(before, 2), "peak_rss_mb": round(peak, 2), "model_rss_mb": round(peak - before, 2)}))
"""


def measure_peak_rss(runtime: str, model: Path, threads: int, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _CHILD, runtime, str(model), str(threads), str(batch), json.dumps(list(input_shape))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"memory probe failed for {model.name}: {tail[0]}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc
