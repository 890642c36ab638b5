"""The demo's artifacts: the digits example built for its profiles, and a deliberately broken
(validly signed, wrong golden vectors) version. The one fleet module that imports the builder,
lazily: `edgefleet demo` needs `edgefleet[builder]`, no other fleet command does."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from agent.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("x86-ipc", "generic-cpu")
# Only the fast candidates: the demo shows the fleet loop, `python3 -m examples.digits` the full search.
DEMO_CANDIDATES = {"x86-ipc": ("int8_static",), "generic-cpu": ("fp32",)}


# ------------------------------------------------------------------------------ artifacts


def digits_work(say: Callable[[str], None]) -> Path:
    """examples/digits prepared (data, trained CNN, signing key); its work directory."""
    sys.path.insert(0, str(REPO))
    try:
        from examples.digits.prepare import WORK, prepare
    except ImportError:
        raise UsageError(
            f"the demo builds examples/digits from the source tree, not found under {REPO} "
            "(install with pip install -e from a checkout)"
        ) from None
    if not (WORK / "digits_cnn.pt").exists():
        say("  first run: training the digits CNN (scikit-learn's bundled data, fixed seed)...")
    prepare(quiet=True)
    return WORK


def build_artifacts(
    out: Path,
    cache: Path,
    work: Path,
    say: Callable[[str], None],
    version: str = "1.0.0",
    profiles: tuple[str, ...] = PROFILES,
    model_weights: Path | None = None,
    data: dict[str, str] | None = None,
) -> dict[str, Path]:
    """The digits example as ``version`` for ``profiles``, signed with the example's key;
    ``model_weights`` and ``data`` (eval/calibration/train paths) replace the example's."""
    from agent.protocol.profile import get_profile
    from agent.protocol.signing import load_private_key
    from builder.config import load_build_config
    from builder.search import Builder

    cfg = load_build_config(REPO / "examples" / "digits" / "edgefleet.toml")
    update: dict[str, object] = {"version": version}
    if model_weights is not None:
        update["model"] = cfg.model.model_copy(update={"weights": str(model_weights)})
    if data is not None:
        update["data"] = cfg.data.model_copy(update=data)
    cfg = cfg.model_copy(update=update)
    builder = Builder(cfg, load_private_key(work / "keys" / "edgefleet.key"), cache)
    arts: dict[str, Path] = {}
    for name in profiles:
        prof = get_profile(name, REPO / "device_profiles")
        prof = prof.model_copy(
            update={"build": prof.build.model_copy(update={"candidates": DEMO_CANDIDATES[name]})}
        )
        t0 = time.monotonic()
        res = builder.build_profile(prof, out)
        if res.artifact is None:
            from builder.profile_result import no_fit_error

            raise no_fit_error(res)
        say(
            f"  built {res.artifact.name} ({res.artifact.stat().st_size / 1024:.0f} KB, "
            f"{DEMO_CANDIDATES[name][0]}) in {time.monotonic() - t0:.1f}s"
        )
        arts[name] = res.artifact
    return arts


def make_broken(good: Path, out: Path, key: Path, version: str) -> Path:
    """``good`` repackaged as ``version`` with golden vectors that do not match the model, signed
    through the builder's own packaging: every signature and hash is valid, the self-test is not."""
    import tarfile
    from dataclasses import replace

    import numpy as np

    from agent.protocol.golden import GoldenCase, GoldenSet
    from agent.protocol.manifest import MANIFEST_NAME, parse_manifest
    from agent.protocol.signing import load_private_key
    from builder.package import file_entry, write_artifact

    work = Path(tempfile.mkdtemp(prefix=".broken-", dir=out))
    try:
        with tarfile.open(good, "r:") as tar:
            fh = tar.extractfile(MANIFEST_NAME)
            assert fh is not None
            m = parse_manifest(json.loads(fh.read()), good.name)
            files: dict[str, Path] = {}
            for name in m.files:
                src = tar.extractfile(name)
                assert src is not None
                files[name] = work / name
                files[name].write_bytes(src.read())
        g = GoldenSet.load(files[m.golden.file])
        # Every case's expected outputs off by 5: the self-test fails however many cases there are.
        off = [
            GoldenCase(
                c.inputs,
                c.reference,
                {k: np.asarray(v, np.float32) + np.float32(5.0) for k, v in c.expected.items()},
            )
            for c in g.cases
        ]
        (replace(g, expected=off[0].expected, more=off[1:])).save(files[m.golden.file])
        entries = {n: file_entry(p) for n, p in files.items()}
        broken = m.model_copy(
            update={
                "version": version,
                "files": entries,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
        dest = out / f"{m.name}-{version}-{m.profile}-broken.efa"
        return write_artifact(dest, broken, files, load_private_key(key))
    finally:
        shutil.rmtree(work, ignore_errors=True)
