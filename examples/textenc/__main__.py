"""`python3 -m examples.textenc`: write the token data if needed, then build it for every profile.

Extra arguments go to `edgefleet build` (for example `--json` or `--out DIR`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from examples.textenc.prepare import prepare

HERE = Path(__file__).resolve().parent


def main() -> int:
    from builder.cli import main as edgefleet

    prepare()
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", "out"]
    return edgefleet(["build", str(HERE / "edgefleet.toml"), "--all-profiles", *args])


if __name__ == "__main__":
    sys.exit(main())
