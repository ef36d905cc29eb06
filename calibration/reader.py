"""Calibration images: chosen, checked and fed to ONNX Runtime's calibrators."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from spade_edge.runtime.errors import ImageError, require
from spade_edge.runtime.images import Preprocess, list_images, load_image
from spade_edge.runtime.progress import progress

MIN_IMAGES = 32  # fewer rarely cover the activation ranges of a line's normal variation


def calibration_images(folder: str | os.PathLike, count: int | None = None, seed: int = 0) -> list[Path]:
    """Up to ``count`` images of ``folder`` (a seeded sample), refusing an empty folder and a
    folder of mixed image sizes (calibrating on mixed cameras or crops is a mistake)."""
    files = list_images(folder)
    if count is not None and count < len(files):
        files = sorted(np.random.default_rng(seed).choice(files, count, replace=False).tolist())  # type: ignore[arg-type]  # an object array of Paths: numpy's stubs take numeric array-likes only
    from PIL import Image

    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except Exception as exc:
            raise ImageError(f"{f}: cannot read this calibration image ({exc})") from exc
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} ({Path(p).name})" for (w, h), p in list(sizes.items())[:3])
        raise ImageError(
            f"{folder}: calibration images differ in size ({shown}); calibrate on images from one camera setup"
        )
    if len(files) < MIN_IMAGES:
        warnings.warn(
            f"calibrating on {len(files)} images; at least {MIN_IMAGES} normal images are recommended", stacklevel=2
        )
    return [Path(f) for f in files]


def make_reader(paths: list[Path], preprocess: Preprocess, input_name: str = "image", show: bool = True):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``paths`` (one image per batch).

    The class is defined here so that importing this module does not import ONNX Runtime.
    """
    quant = require("onnxruntime.quantization", "cpu", "INT8 calibration")

    class ImageReader(quant.CalibrationDataReader):  # type: ignore[name-defined]  # a module imported at run time
        def __init__(self):
            self.rewind()

        def rewind(self):
            self._it = iter(progress(paths, len(paths), "calibration", show))

        def get_next(self):
            p = next(self._it, None)
            if p is None:
                return None
            return {input_name: preprocess(load_image(p))[0][None]}

    return ImageReader()
