"""Pixel scorer interface: for every query feature, the kappa smallest squared distances to a
gallery streamed in blocks, and where they were found."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Sequence

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
    def topk(self, query: np.ndarray, blocks: Iterable[np.ndarray], kappa: int,
             sqnorms: Iterable[np.ndarray] | None = None) -> TopK:
        """Search ``query`` (P, D) against the rows of ``blocks``; return the kappa nearest.
        ``sqnorms``: each block's squared row norms, where the caller keeps them (a scorer may
        use them instead of computing its own)."""

    def topk_pyramid(self, query: list[np.ndarray], images: Sequence[list[np.ndarray]], grid: tuple[int, int],
                     kappa: int) -> TopK:
        """The concatenated pyramid: ``query`` and every gallery image are lists of (h_l, w_l, C_l)
        level maps (``images`` may decode on indexing; a scorer may index an image more than once),
        compared as if each were bilinearly upsampled to ``grid`` and concatenated.
        Row indices count ``grid`` cells image after image. This default upsamples and concatenates;
        scorers may compute the same distances more cheaply."""
        return self.topk(concat_upsampled(query, grid), (concat_upsampled(g, grid) for g in images), kappa)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def concat_upsampled(levels: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """(h_l, w_l, C_l) maps -> their bilinear upsampling to ``grid``, concatenated: (H*W, sum C_l)."""
    from ..resample import upsample_hwc

    return np.concatenate([upsample_hwc(x, *grid) for x in levels], axis=2).reshape(grid[0] * grid[1], -1)
