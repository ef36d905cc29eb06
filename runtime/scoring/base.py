"""Pixel scorer interface: for every query feature, the kappa smallest squared distances to a
gallery streamed in blocks, and where they were found."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass
class TopK:
    """``distances`` (P, kappa) squared L2, ascending; ``indices`` (P, kappa) into the
    concatenation of all gallery blocks, in the order they were given."""

    distances: np.ndarray
    indices: np.ndarray


class PixelScorer(ABC):
    """Exact kappa-nearest-neighbour search of query rows against gallery rows.

    Subclasses implement :meth:`topk`; the gallery arrives as an iterable of (M_i, D) blocks in
    whatever dtype the gallery stores, so that a scorer never needs the whole gallery in fp32.
    """

    name: str = "base"

    @abstractmethod
    def topk(self, query: np.ndarray, blocks: Iterable[np.ndarray], kappa: int) -> TopK:
        """Search ``query`` (P, D) against the rows of ``blocks``; return the kappa nearest."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
