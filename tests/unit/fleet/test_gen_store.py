"""Text-generation windows on the fleet side: the generation row of a telemetry message, tok/s in
`fleet status`, the report's charts; older messages (no block) stay valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.protocol.messages import GenerationWindow, Telemetry
from agent.telemetry.generation import GenRecorder
from fleet.db import Batch, FleetDB
from fleet.fleet_report import render
from fleet.gen_store import latest_tok_s, windows
from fleet.ingest import add_message
from fleet.view import COLUMNS, cells, rows_from_db, shown
from tests.fleet_helpers import dumps, state, telemetry

T = "edgefleet/v1/devices/{}/{}"


def gen_block(tok_s: float | None, ttft: float = 40.0) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "requests": 3,
        "tokens": 90,
        "ttft_p50_ms": ttft,
        "ttft_p95_ms": 2 * ttft,
    }
    if tok_s is not None:
        doc["tok_s"] = tok_s
    return {**doc, "queue_max": 2, "rejected": 1}


def test_generation_block_becomes_a_row_and_shows_in_status_and_report(tmp_path: Path) -> None:
    db = FleetDB(str(tmp_path / "fleet.db"))
    b = Batch.empty()
    add_message(b, T.format("d1", "state"), dumps(state("d1", 1)), 9.0)
    add_message(b, T.format("d2", "state"), dumps(state("d2", 1)), 9.0)
    for seq, tok in ((2, 30.0), (3, 32.5), (4, None)):  # the last window measured no decode
        doc = {**telemetry("d1", seq, ts=10.0 + seq), "generation": gen_block(tok)}
        add_message(b, T.format("d1", "telemetry"), dumps(doc), 11.0)
    add_message(b, T.format("d2", "telemetry"), dumps(telemetry("d2", 2, ts=12.0)), 12.0)
    assert db.store(b) == 6 and db.count("generation") == 3  # rows ride on their telemetry
    row = db.query("SELECT * FROM generation WHERE seq = 3")[0]
    assert (row["model"], row["tokens"], row["tok_s"], row["ttft_p95_ms"]) == (
        "tiny",
        90,
        32.5,
        80.0,
    )
    assert (row["queue_max"], row["rejected"]) == (2, 1)
    assert latest_tok_s(db) == {"d1": 32.5} and len(windows(db, "d1")) == 3
    rows = {r.device: r for r in rows_from_db(db)}
    tok = COLUMNS.index("tok/s")
    assert cells(rows["d1"], 20.0)[tok] == "32.5" and cells(rows["d2"], 20.0)[tok] == "-"
    assert COLUMNS.index("tok/s") in shown(list(rows.values()))
    assert COLUMNS.index("tok/s") not in shown([rows["d2"]])  # a tensor-only fleet: no column
    html = render(db, now=20.0)
    assert "<th>tok/s</th>" in html
    assert "text generation speed" in html and "time to first token" in html
    d2 = html.split('id="dev-d2"')[1].split("</section>")[0]
    assert "time to first token" not in d2  # only a device that generates text has the charts


def test_recorder_window_to_message_and_old_messages_stay_valid() -> None:
    rec = GenRecorder(seed=0)
    assert rec.window() is None  # nothing happened: no block
    rec.queued(3)
    rec.queued(0)
    rec.rejected()
    rec.finished(11, 0.05, 0.5)
    rec.finished(1, 0.03, 0.0, cancelled=True)
    w = rec.window()
    assert w is not None
    g = GenerationWindow.model_validate(w.as_dict())
    assert (g.requests, g.tokens, g.tok_s, g.queue_max, g.rejected, g.cancelled) == (
        2, 12, 20.0, 3, 1, 1,
    )  # fmt: skip
    assert g.ttft_p50_ms is not None and 30.0 <= g.ttft_p50_ms <= 50.0
    assert Telemetry.model_validate(telemetry("d1", 1)).generation is None
