"""How a rollout shows its progress: a live table on a terminal, else one line per change."""

from __future__ import annotations

from typing import Any

from agent.protocol.states import SERVING
from fleet.rollout.policy import BAD_STATES, DONE_STATES, Rollout


class RolloutDisplay:
    """Progress on stderr: a live table on a terminal, else one line per device change."""

    def __init__(self, title: str = "rollout", live: bool | None = None) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            self.console = Console(stderr=True, width=160)
        self.title = title
        self.live_on = self.console.is_terminal if live is None else live
        self._live: Any = None
        self._seen: dict[str, tuple[Any, ...]] = {}

    def __enter__(self) -> RolloutDisplay:
        if self.live_on:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def table(self, ro: Rollout) -> Any:
        from rich.table import Table

        t = Table(title=f"{self.title}: {ro.name} {ro.version} ({ro.phase})")
        for col in ("device", "role", "online", "state", "progress", "p95 new/old ms", "reason"):
            t.add_column(col)
        for d, v in sorted(ro.devices.items(), key=lambda kv: (kv[1].role != "canary", kv[0])):
            p95 = (
                f"{v.p95_ms:.3f}/{v.current_p95_ms:.3f}"
                if v.p95_ms is not None and v.current_p95_ms is not None
                else (f"{v.p95_ms:.3f}/-" if v.p95_ms is not None else "")
            )
            state = v.state if v.online or v.state in DONE_STATES else f"{v.state} (offline)"
            color = "green" if v.state in SERVING else "red" if v.state in BAD_STATES else "yellow"
            t.add_row(
                d,
                v.role,
                "yes" if v.online else "no",
                f"[{color}]{state}[/{color}]",
                f"{v.progress * 100:.0f}%" if v.progress is not None else "",
                p95,
                v.reason[:80],
            )
        return t

    def __call__(self, ro: Rollout) -> None:
        if self._live is not None:
            self._live.update(self.table(ro))
            return
        for d, v in sorted(ro.devices.items()):
            key = (v.state, v.online, v.rolled_back, ro.phase)
            if self._seen.get(d) != key:
                self._seen[d] = key
                extra = ""
                if v.state == "ACTIVE" and v.p95_ms is not None:
                    extra = f" p95 {v.p95_ms:.3f} ms" + (
                        f" (replaced model: {v.current_p95_ms:.3f} ms)"
                        if v.current_p95_ms is not None
                        else ""
                    )
                self.console.print(
                    f"[{ro.phase}] {d} ({v.role}{'' if v.online else ', offline'}): {v.state}{extra}"
                    + (f" - {v.reason}" if v.reason else ""),
                    highlight=False,
                    markup=False,
                )
