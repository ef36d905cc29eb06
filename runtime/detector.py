"""The detector: an image in; score, verdict, heat map and correspondences out."""

from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .features import FeatureBackend
from .gallery import Gallery
from .images import Geometry, ImageLike, Preprocess, fit_image, map_to_original
from .scoring import PixelScorer, cpu_scorer
from .spade import Correspondence, SpadeConfig, final_score, image_knn, pixel_scores, smooth

OK, NOT_OK = "OK", "NOT_OK"


@dataclass
class Prediction:
    """What SPADE says about one image.

    ``anomaly_map`` is at the model's input size (the crop the model saw); ``anomaly_map_full`` is
    the same map on the original image (0 outside the inspected crop). ``verdict`` is None when
    the gallery holds no threshold.
    """

    score: float
    verdict: str | None
    anomaly_map: np.ndarray
    anomaly_map_full: np.ndarray
    neighbors: list[str]
    neighbor_distances: list[float]
    correspondence: Correspondence
    correspondence_names: list[str]
    geometry: Geometry
    input_image: np.ndarray  # what the model saw (S x S x 3 uint8)
    timings: dict = field(default_factory=dict)
    name: str | None = None
    image_score: float = 0.0  # the image stage's (mean distance to the K nearest), whatever ``score`` is

    @property
    def max_pixel_score(self) -> float:
        return float(self.anomaly_map.max())

    def worst_pixel(self) -> tuple[int, int]:
        """(row, col) of the map maximum, in model-input pixels."""
        r, c = np.unravel_index(int(np.argmax(self.anomaly_map)), self.anomaly_map.shape)
        return int(r), int(c)

    def to_dict(self) -> dict:
        """A JSON-ready summary (no maps)."""
        r, c = self.worst_pixel()
        img, mr, mc = self.correspondence.at(r, c)
        return {
            "image": self.name,
            "score": round(self.score, 6),
            "verdict": self.verdict,
            "image_score": round(self.image_score, 6),
            "max_pixel_score": round(self.max_pixel_score, 6),
            "worst_pixel": {
                "row": r,
                "col": c,
                "matched_image": self.correspondence_names[img],
                "matched_row": round(mr, 1),
                "matched_col": round(mc, 1),
            },
            "neighbors": self.neighbors[:5],
            "timings_ms": {k: round(v * 1e3, 2) for k, v in self.timings.items()},
        }


class _Sharing:
    """How many detectors use one backend (:meth:`Detector.with_gallery`)."""

    def __init__(self):
        self._lock, self._users = threading.Lock(), 1

    def join(self) -> None:
        with self._lock:
            self._users += 1

    def leave(self) -> bool:
        """One user fewer; True for the last one (it closes the backend)."""
        with self._lock:
            self._users -= 1
            return self._users == 0


class Detector:
    """SPADE on one feature backend, one gallery and one pixel scorer (by default this CPU's;
    :meth:`load` takes the scorer that follows the features onto the GPU).

    >>> det = Detector.load("model.onnx", "parts.gallery")
    >>> p = det.predict("part.png"); p.score, p.verdict, p.anomaly_map.shape
    """

    def __init__(
        self,
        backend: FeatureBackend,
        gallery: Gallery,
        scorer: PixelScorer | None = None,
        config: SpadeConfig | None = None,
        preprocess: Preprocess | None = None,
    ):
        gallery.check_model(backend.info)
        self.backend, self.gallery = backend, gallery
        self.device = f"{backend.name} on {backend.device}"  # Detector.load says more: what was chosen and why
        self.fallback: str | None = None
        self.scorer = scorer or cpu_scorer()
        self.scorer.attach(gallery)  # a GPU scorer uploads the gallery once, here (and on every reload)
        stored = gallery.manifest.get("config")
        self.config = config or (SpadeConfig.from_dict(stored) if stored else SpadeConfig())
        self.config.level_names(backend.info)  # validates the level subset now, not per image
        pre = gallery.manifest.get("preprocess")
        self.preprocess = preprocess or (Preprocess(**pre) if pre else Preprocess(backend.info.input_size))
        self._overrides: dict = {}  # scoring settings given to load() over the gallery's, kept by with_gallery
        self._sharing = _Sharing()  # detectors sharing this backend (with_gallery): the last one closes it
        if self.config.score == "combined" and not gallery.manifest.get("normal"):
            raise ValueError(
                "score='combined' needs the normal statistics a gallery built with --holdout > 0 stores; "
                "rebuild it so, or pass another score (--score top-pixels)"
            )
        th = gallery.thresholds
        if th.get("config") and th["config"] != self.config.to_dict():
            warnings.warn(
                "scoring settings differ from those the gallery's thresholds were computed "
                "with; verdicts may be off (rebuild the gallery or recompute thresholds)",
                stacklevel=2,
            )

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        gallery: str | os.PathLike | Gallery,
        device: str = "auto",
        threads: int | None = None,
        fp16: bool = False,
        **config,
    ) -> Detector:
        """Open ``model`` (ONNX, or a TensorRT ``.engine``) and ``gallery`` on ``device`` ('auto', 'cpu',
        'cuda[:N]', 'tensorrt[:N]': runtime/device.py); ``det.device`` says what was chosen and why,
        ``det.fallback`` what 'auto' could not have. Keyword arguments override the gallery's stored
        :class:`SpadeConfig` (k_image, k_gallery, kappa, mode, levels, sigma). ``threads`` bounds ONNX
        Runtime and the scorer's BLAS alike; ``fp16`` lets ONNX Runtime's TensorRT provider use half
        precision."""
        from .device import place
        from .threads import set_threads

        set_threads(threads)  # numpy's BLAS in the scorer; ONNX Runtime gets the same number below
        g = gallery if isinstance(gallery, Gallery) else Gallery.load(gallery)
        cfg = None
        if config:
            base = g.manifest.get("config") or {}
            cfg = SpadeConfig.from_dict({**base, **config})
        placed = place(model, device, threads, fp16)
        try:
            det = cls(placed.backend, g, placed.scorer, cfg)
        except Exception:
            placed.backend.close()
            raise
        det.device, det.fallback = placed.why, placed.fallback
        det._overrides = dict(config)
        return det

    def with_gallery(self, gallery: Gallery) -> Detector:
        """This detector's backend, not loaded again, with another gallery of the same model (a
        gallery grown or rolled back): the scorer is copied and attaches the new gallery (on a GPU,
        uploads it), scoring settings are the new gallery's under the same overrides :meth:`load` was
        given. Both detectors may be closed, in any order: the backend is released by the last."""
        cfg = (
            SpadeConfig.from_dict({**(gallery.manifest.get("config") or {}), **self._overrides})
            if self._overrides
            else None
        )
        self._sharing.join()
        try:
            other = type(self)(self.backend, gallery, copy.copy(self.scorer), cfg)
        except BaseException:
            self._sharing.leave()
            raise
        other.device, other.fallback = self.device, self.fallback
        other._overrides, other._sharing = dict(self._overrides), self._sharing
        return other

    def close(self) -> None:
        """Release the backend (its session or engine, and GPU memory) unless another detector made by
        :meth:`with_gallery` still uses it, and this detector's scorer; from any thread."""
        if self._sharing.leave():
            self.backend.close()
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()

    # The inspection path, step by step: every caller (service, watch folder, line adapters, gallery
    # build's held-out scoring, evaluate, the benches) goes through these, so SPADE is implemented once.

    def prepare(self, image: ImageLike, name: str | None = None) -> tuple[np.ndarray, Geometry]:
        """Step 1: decode, validate and fit an image to the model input (S x S x 3 uint8)."""
        return fit_image(image, self.preprocess, name)  # decoded-pixel memory: images.decode_cost

    def extract(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Step 2: the features of one prepared image (levels (C, h, w), the global vector (C,))."""
        return {k: v[0] for k, v in self.backend(x[None]).items()}

    def with_config(self, config: SpadeConfig) -> Detector:
        """The same backend, gallery and scorer under other scoring settings (for sweeps: features
        extracted once can be scored under each)."""
        other = copy.copy(self)
        config.level_names(self.backend.info)
        other.config = config
        return other

    def predict(self, image: ImageLike, name: str | None = None) -> Prediction:
        """Score one image (path, bytes, PIL image or uint8 array): :meth:`prepare`, :meth:`extract`,
        :meth:`score`, timed."""
        t0 = time.perf_counter()
        x, geom = self.prepare(image, name)
        t1 = time.perf_counter()
        features = self.extract(x)
        t2 = time.perf_counter()
        p = self.score(features, x, geom)
        p.timings = {"preprocess": t1 - t0, "backbone": t2 - t1, **p.timings}
        p.name = name if name is not None else (os.fspath(image) if isinstance(image, (str, os.PathLike)) else None)
        return p

    def score(self, features: dict[str, np.ndarray], x: np.ndarray, geom: Geometry) -> Prediction:
        """Step 3: the image stage, the pixel stage, the map and the verdict, from one image's
        features (as :meth:`extract` gives them) and what :meth:`prepare` returned."""
        info, cfg, g = self.backend.info, self.config, self.gallery
        t0 = time.perf_counter()
        dist, idx = image_knn(features[info.global_name], g, max(cfg.k_image, cfg.k_gallery))
        image_score = float(dist[: cfg.k_image].mean())
        neighbors = idx[: cfg.k_gallery]
        t1 = time.perf_counter()
        raw, corr = pixel_scores(features, g, neighbors, info, cfg, self.scorer)
        t2 = time.perf_counter()
        amap = smooth(raw, cfg.sigma)
        full = map_to_original(amap, geom)
        t3 = time.perf_counter()
        score = final_score(cfg.score, image_score, amap, g.manifest.get("normal"))
        thr = g.thresholds.get("image")
        # a score that is not a number (a model giving NaN or inf) is no proof of a good part
        verdict = None if thr is None else (OK if score <= thr else NOT_OK)
        return Prediction(
            score=score,
            verdict=verdict,
            anomaly_map=amap,
            anomaly_map_full=full,
            image_score=image_score,
            neighbors=[g.names[i] for i in neighbors],
            neighbor_distances=[float(d) for d in dist[: cfg.k_gallery]],
            correspondence=corr,
            correspondence_names=g.names,
            geometry=geom,
            input_image=x,
            timings={"image_knn": t1 - t0, "pixel_scoring": t2 - t1, "map": t3 - t2},
        )
