"""Feature backend interface: a uint8 image batch in, named feature arrays out.

Modelled on Polygraphy's runners: a small lifecycle, name -> array dicts, subclasses fill in
``_infer``. Every backend exposes the :class:`ModelInfo` it read from the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import ImageError
from ..modelinfo import ModelInfo


class FeatureBackend(ABC):
    """Runs the exported feature extractor. Input: (N, S, S, 3) uint8, S = ``info.input_size``.
    Output: ``{level name: (N, C, h, w) float32, ..., info.global_name: (N, C_global)}``."""

    name: str = "base"
    device: str = "cpu"  # where the features come out: the detector scores on the same device
    info: ModelInfo

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        s = self.info.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise ImageError(f"backend input must be uint8 (N, {s}, {s}, 3), got {batch.dtype} {batch.shape}")
        return self._infer(np.ascontiguousarray(batch))

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on a validated batch."""

    def close(self) -> None:
        """Release the session or engine."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.backbone})"
