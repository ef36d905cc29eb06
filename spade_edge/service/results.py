"""The results the operator's page shows: each kept with its image, map and correspondences, in a
ring bounded in number and bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Entry:
    """One result kept for the page."""

    id: str
    seq: int
    time: float
    summary: dict
    data: bytes | np.ndarray  # the image as sent (or a camera's RGB frame): 'good part' adds exactly it
    input_image: np.ndarray  # what the model saw (S x S x 3)
    amap: np.ndarray  # the anomaly map at the model input (S x S)
    corr: Any  # runtime.spade.Correspondence
    names: list[str]  # the gallery's image names the correspondence indexes
    gallery: Any  # the generation's Gallery (memory-mapped), for its thumbnails
    pixel_threshold: float | None
    review: dict | None = None
    cache: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        c = self.corr
        size = self.data.nbytes if isinstance(self.data, np.ndarray) else len(self.data)
        return size + self.input_image.nbytes + self.amap.nbytes + c.image.nbytes + c.y.nbytes + c.x.nbytes


class Ring:
    """The last results, bounded in number and bytes; oldest dropped first."""

    def __init__(self, n: int, max_bytes: int):
        self.n, self.max_bytes = n, max_bytes
        self._d: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.seq = 0

    def add(self, e: Entry) -> None:
        with self._lock:
            self.seq += 1
            e.seq = self.seq
            self._d[e.id] = e
            self._bytes += e.nbytes
            while self._d and (len(self._d) > self.n or self._bytes > self.max_bytes):
                _, old = self._d.popitem(last=False)
                self._bytes -= old.nbytes

    def get(self, rid: str) -> Entry | None:
        with self._lock:
            return self._d.get(rid)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._d.values())

    @property
    def nbytes(self) -> int:
        return self._bytes
