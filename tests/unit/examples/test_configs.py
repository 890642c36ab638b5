"""The examples' build configs: well-formed, and pointing at what their prepare steps write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NEW = ("textenc", "vad")


@pytest.mark.parametrize("name", NEW)
def test_config_names_prepared_files_and_inputs(name: str) -> None:
    cfg = tomllib.loads((EXAMPLES / name / "edgefleet.toml").read_text(encoding="utf-8"))
    assert cfg["name"] == name
    model = cfg["model"]
    if "factory" in model:
        assert (EXAMPLES / name / model["factory"].split(":")[0]).is_file()
    for rel in [*cfg["data"].values(), model.get("onnx"), cfg["signing_key"]]:
        if rel:
            assert rel.startswith("work/"), (
                f"{rel}: everything generated lives in work/ (git-ignored)"
            )
    expected = {"textenc": ["input_ids", "attention_mask"], "vad": ["input", "state", "sr"]}[name]
    assert model["inputs"] == expected


def test_configs_load_with_the_builder() -> None:
    from builder.config import ModelSource, load_build_config

    if "inputs" not in ModelSource.model_fields:
        pytest.skip(
            "builder config without multi-input fields (the issue 10 spine is not merged yet)"
        )
    for name in NEW:
        load_build_config(EXAMPLES / name / "edgefleet.toml")
