"""Fixed-memory sketches: counts per bin on the reference's quantile edges, nothing else.

No value is kept: each observed array is binned at once (``np.searchsorted`` on edges computed
at build time) and only the counts grow. Memory is (edges + 1) integers per tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# Values binned per tensor per call at most (a strided subsample beyond): bounds the cost of
# one observation of a large tensor (an image) without biasing the histogram much.
MAX_VALUES_PER_CALL = 1024


class Histogram:
    """Counts of values per reference bin; bin i holds edges[i-1] <= v < edges[i].

    ``ref`` is the reference share per bin. NaN lands in the last bin (it sorts last).
    """

    __slots__ = ("counts", "edges", "ref")

    def __init__(self, edges: list[float], probs: list[float]) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.ref = np.asarray(probs, dtype=np.float64)
        if self.ref.size != self.edges.size + 1:
            raise ValueError(f"{self.edges.size} edges need {self.edges.size + 1} shares")
        self.counts = np.zeros(self.edges.size + 1, dtype=np.int64)

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Histogram:
        return cls(doc["edges"], doc["probs"])

    def add(self, values: npt.NDArray[Any]) -> None:
        v = values.reshape(-1)
        if v.size > MAX_VALUES_PER_CALL:
            v = v[:: -(-v.size // MAX_VALUES_PER_CALL)]
        self.counts += np.bincount(
            self.edges.searchsorted(v, side="right"), minlength=self.counts.size
        )

    def take(self) -> npt.NDArray[np.int64]:
        """The counts so far; the sketch starts again from zero."""
        c, self.counts = self.counts, np.zeros_like(self.counts)
        return c

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes + self.edges.nbytes + self.ref.nbytes)
