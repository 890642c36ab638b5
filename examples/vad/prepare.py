"""Resolve the Silero VAD ONNX file from its wheel and write streaming frames the build config names.

The model comes from the ``silero-vad`` wheel (``pip install --no-deps silero-vad``; nothing
of it is committed here): ``silero_vad_16k_op15.onnx``, the 16 kHz-only export whose convs
sit in the main graph (the default ``silero_vad.onnx`` wraps everything in an ``If`` on the
sample rate, which quantizers do not look inside). It is copied to work/silero_vad.onnx.

Each sample is one step of the stream: ``input`` [576] float32 is 64 samples of context (the
tail of the previous step, zeros at the start of a clip) followed by 512 new samples, as the
package's own OnnxWrapper feeds the model; ``state`` [2, 128] is the recurrent state the
fp32 model produced over the previous steps of the same clip (zeros for the first step), so
quantized candidates are judged on realistic states; ``sr`` is 16000. ``y`` [1] is the fp32
speech probability. Writes eval.npz and calib.npz (disjoint clip seeds) and a signing key
pair under keys/. Re-running reuses finished outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
MODEL_FILE = "silero_vad_16k_op15.onnx"
PIP_INSTALL = "pip install --no-deps silero-vad"
SR = 16000
FRAME = 512
CONTEXT = 64
# clips per kind in each split, and the first seed of the split (splits never share a clip)
SPLITS: dict[str, tuple[dict[str, int], int]] = {
    "eval": ({"speech": 8, "noisy_speech": 4, "non_speech": 10}, 1000),
    "calib": ({"speech": 4, "noisy_speech": 2, "non_speech": 5}, 2000),
}
CLIP_SECONDS = 2.0


def packaged_model() -> Path:
    """The ONNX file inside the installed silero-vad wheel."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the vad example needs the Silero VAD model: {PIP_INSTALL}")
    path = Path(spec.origin).resolve().parent / "data" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing (a silero-vad without the 16k op15 export?); {PIP_INSTALL} --upgrade"
        )
    return path


class Streamer:
    """Runs the fp32 model over a clip step by step, as a device would."""

    def __init__(self, model: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3  # the export carries unused initializers ort warns about
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        """input [T, 576], state [T, 2, 128] (before each step), sr [T], y [T, 1] for one clip."""
        steps = len(audio) // FRAME
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(CONTEXT, np.float32)
        xs, states, probs = [], [], []
        for i in range(steps):
            x = np.concatenate([context, audio[i * FRAME : (i + 1) * FRAME]]).astype(np.float32)
            xs.append(x)
            states.append(state[:, 0, :])
            prob, state = self.session.run(
                None, {"input": x[None], "state": state, "sr": np.array(SR, np.int64)}
            )
            probs.append(prob[0])
            context = x[-CONTEXT:]
        return {
            "input": np.stack(xs),
            "state": np.stack(states).astype(np.float32),
            "sr": np.full(steps, SR, np.int64),
            "y": np.stack(probs).astype(np.float32),
        }


def make_split(
    streamer: Streamer, clips: dict[str, int], first_seed: int
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Concatenated steps of every clip of a split, and a per-clip summary."""
    from examples.vad.synth import KINDS, NON_SPEECH_KINDS

    parts: list[dict[str, np.ndarray]] = []
    summary: list[dict[str, Any]] = []
    seed = first_seed
    for kind, count in clips.items():
        for _ in range(count):
            steps = streamer.run(KINDS[kind](seed, CLIP_SECONDS))
            p = steps["y"][:, 0]
            name = (
                f"non_speech/{NON_SPEECH_KINDS[seed % len(NON_SPEECH_KINDS)]}"
                if kind == "non_speech"
                else kind
            )
            summary.append(
                {
                    "kind": name,
                    "seed": seed,
                    "steps": len(p),
                    "mean_prob": round(float(p.mean()), 4),
                    "median_prob": round(float(np.median(p)), 4),
                    "max_prob": round(float(p.max()), 4),
                }
            )
            parts.append(steps)
            seed += 1
    return {k: np.concatenate([s[k] for s in parts]) for k in parts[0]}, summary


def make_data(work: Path) -> dict[str, list[dict[str, Any]]]:
    src = packaged_model()
    shutil.copyfile(src, work / "silero_vad.onnx")
    streamer = Streamer(work / "silero_vad.onnx")
    summaries = {}
    for name, (clips, first_seed) in SPLITS.items():
        arrays, summaries[name] = make_split(streamer, clips, first_seed)
        np.savez(work / f"{name}.npz", **arrays)  # type: ignore[arg-type]
    doc = {"model": str(src), "clips": summaries}
    (work / "clips.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return summaries


def prepare(work: Path = WORK, force: bool = False, quiet: bool = False) -> None:
    from examples.common import ensure_signing_key, stderr_say

    say = stderr_say(quiet)
    work.mkdir(parents=True, exist_ok=True)
    outputs = ["silero_vad.onnx", *(f"{name}.npz" for name in SPLITS)]
    if force or not all((work / name).exists() for name in outputs):
        summaries = make_data(work)
        for name, clips in summaries.items():
            by_kind: dict[str, list[float]] = {}
            for c in clips:
                by_kind.setdefault(c["kind"].split("/")[0], []).append(c["median_prob"])
            kinds = ", ".join(f"{k} {np.mean(v):.2f}" for k, v in by_kind.items())
            say(
                f"vad {name}: {sum(c['steps'] for c in clips)} steps; mean per-clip median p(speech): {kinds}"
            )
        say(f"vad model and data written to {work}")
    ensure_signing_key(work, say)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--force", action="store_true", help="rewrite the model copy and the data")
    prepare(force=ap.parse_args().force)
