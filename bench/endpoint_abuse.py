"""The local inference endpoint under abuse, over real loopback sockets, the endpoint in its own
process (tests/serve_abuse.py) so its RSS is its own:

* slow clients: N clients hold connections (part of a head, one byte every 2 s, reconnecting when
  dropped) for a handful of slots while legitimate requests are made: their success rate;
* large bodies: 8 concurrent 16 MiB JSON infer requests, with the default body budget
  (serve.max_body_bytes_in_flight) and, side by side, with the budget off: statuses and the
  server's RSS before, at its peak and after.

    python3 bench/endpoint_abuse.py [--slow 100] [--slots 16] [--legit 200]

Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.agent_helpers import make_onnx  # noqa: E402
from tests.serve_abuse import MiB, Server, large_bodies, slow_clients  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slow", type=int, default=100, help="slow clients (default 100)")
    ap.add_argument("--slots", type=int, default=16, help="serve.max_connections (default 16)")
    ap.add_argument("--legit", type=int, default=200, help="legitimate requests (default 200)")
    ap.add_argument("--bodies", type=int, default=8, help="concurrent large bodies (default 8)")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny.onnx"
        make_onnx(model, seed=0)
        print(f"slow clients: {args.slow} for {args.slots} slots ...", file=sys.stderr)
        with Server(model, max_connections=args.slots, request_timeout_s=10.0) as s:
            sc = slow_clients(s.port, args.slow, args.legit)
        print(
            f"legit requests under {args.slow} slow clients: {sc['legit_ok']}/{args.legit} ok "
            f"({sc['legit_success_rate']:.1%}), p50 {sc['legit_p50_ms']} ms, max "
            f"{sc['legit_max_ms']} ms; statuses {sc['legit_statuses']}; the slow ones were "
            f"dropped {sc['slow_reconnects']} times"
        )
        out["slow_clients"] = sc
        for label, serve in (
            ("budget", {}),
            ("no_budget", {"max_body_bytes_in_flight": 2**34}),
        ):
            print(f"large bodies, {label} ...", file=sys.stderr)
            with Server(model, max_connections=64, **serve) as s:
                lb = large_bodies(s, n=args.bodies, size=16 * MiB)
            print(
                f"{args.bodies} x {lb['body_mb']} MiB JSON, {label:>9}: {lb['ok']} ok, "
                f"{lb['refused_503']} x 503; RSS {lb['rss_before_mb']} -> peak "
                f"{lb['rss_peak_mb']} -> after {lb['rss_after_mb']} MB"
            )
            out[f"large_bodies_{label}"] = lb
    b, nb = out["large_bodies_budget"], out["large_bodies_no_budget"]
    assert isinstance(b, dict) and isinstance(nb, dict)
    out["peak_growth_ratio"] = round(
        (b["rss_peak_mb"] - b["rss_before_mb"]) / max(1.0, nb["rss_peak_mb"] - nb["rss_before_mb"]),
        3,
    )
    out["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    main()
