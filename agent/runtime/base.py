"""The runtime interface: load, infer, io spec, close."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    # An int8/uint8 tensor with a scale that the adapter (de)quantizes: callers exchange float32.
    quantized: bool = False


class InferenceSession(ABC):
    """A loaded model. ``infer`` takes and returns arrays of each tensor's dtype keyed by name."""

    @property
    @abstractmethod
    def inputs(self) -> list[IOSpec]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[IOSpec]: ...

    @abstractmethod
    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources; the default has none to release."""

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
