"""`edgefleet deploy --capture KEY=VALUE`: the keys a deployment carries, checked before signing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.errors import UsageError
from fleet.deploy import capture_keys
from tests.agent_helpers import REPO


def test_pairs_become_checked_capture_keys() -> None:
    keys = capture_keys(
        ("sample_rate=0.5", "triggers=label,drift", "outputs_only=true", "max_per_hour=200")
    )
    assert keys == {
        "enabled": True,
        "sample_rate": 0.5,
        "triggers": ["label", "drift"],
        "outputs_only": True,
        "max_per_hour": 200,
    }
    assert capture_keys(["off"]) == {"enabled": False}
    assert capture_keys(("redact=hooks.py:scrub",))["redact"] == "hooks.py:scrub"


@pytest.mark.parametrize(
    ("pairs", "says"),
    [
        (("sample_rate",), "give KEY=VALUE"),
        (("sample_rate=2",), "--capture sample_rate:"),
        (("triggers=label,sometimes",), "--capture triggers.1:"),
        (("colour=blue",), "--capture colour: Extra inputs are not permitted"),
        (("redact=nofunction",), "--capture redact:"),
    ],
)
def test_bad_keys_are_one_line_usage_errors(pairs: tuple[str, ...], says: str) -> None:
    with pytest.raises(UsageError, match=None) as exc:
        capture_keys(pairs)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_capture_does_not_go_with_a_staged_rollout() -> None:
    # the session's operator key comes from tests/conftest.py ($EDGEFLEET_OPERATOR_KEY)
    args = ["deploy", "digits@1.0.0", "--group", "lab", "--canary", "1"]
    args += ["--capture", "sample_rate=1", "--broker", "mqtt://127.0.0.1:9"]
    res = subprocess.run(
        [sys.executable, "-m", "agent.clikit", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert "--capture goes with a plain deploy" in res.stderr, res.stderr
