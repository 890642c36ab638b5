"""An output named like a value the exporter made up internally still gives a loadable model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # a dynamo export: ~30 s on this machine


class _Bag(torch.nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(ids).mean(1))


def test_output_name_reused_by_an_internal_value_is_renamed(tmp_path: Path) -> None:
    import onnxruntime as ort

    from builder.passes.export_onnx import dedupe_value_names

    path = tmp_path / "m.onnx"
    ids = torch.randint(0, 50, (2, 5))
    module = _Bag().eval()
    torch.onnx.export(
        module,
        (ids,),
        str(path),
        dynamo=True,
        external_data=False,
        input_names=["ids"],
        output_names=["embedding"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
    )
    with pytest.raises(Exception, match="embedding"):
        ort.InferenceSession(str(path))  # the exporter's own "embedding" value collides
    assert dedupe_value_names(path, {"embedding"}) == ["embedding"]
    got = ort.InferenceSession(str(path)).run(["embedding"], {"ids": ids.numpy()})[0]
    with torch.no_grad():
        want = module(ids).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert dedupe_value_names(path, {"embedding"}) == []  # nothing left to rename
