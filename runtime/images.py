"""Image input: decode and validate anything a user may pass, and fit it to the model's input.

Only geometry happens here (resize, crop); dtype cast, normalisation and layout run in the model.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .errors import ImageError

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, "PIL.Image.Image"]  # noqa: F821

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _pil():
    from PIL import Image  # Pillow is a core dependency; imported here to keep import time low

    return Image


def _from_pil(img, name: str) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit industrial cameras: keep the top 8 bits of the used range
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        raise ImageError(f"{name}: image has an alpha channel ({mode}); save it as RGB or grayscale")
    if mode not in ("L", "RGB"):
        try:
            img = img.convert("RGB")
        except Exception as exc:
            raise ImageError(f"{name}: unsupported image mode {mode!r}") from exc
    return np.asarray(img)


def load_image(src: ImageLike, name: str | None = None) -> np.ndarray:
    """Return ``src`` as a uint8 array of shape (H, W, 3).

    Accepts a path, encoded bytes, a PIL image, or a numpy array (H x W or H x W x 3, uint8).
    Grayscale is replicated to three channels. Anything else raises :class:`ImageError`
    naming the problem.
    """
    Image = _pil()
    if isinstance(src, (str, os.PathLike)):
        name = name or str(src)
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"{name}: no such image file")
        try:
            with Image.open(path) as img:
                img.load()
                arr = _from_pil(img, name)
        except ImageError:
            raise
        except Exception as exc:  # PIL raises many types for bad files
            raise ImageError(f"{name}: cannot decode image ({exc}); the file is corrupt or truncated") from exc
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        if len(src) == 0:
            raise ImageError(f"{name}: empty byte string")
        try:
            with Image.open(io.BytesIO(bytes(src))) as img:
                img.load()
                arr = _from_pil(img, name)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"{name}: cannot decode image bytes ({exc}); corrupt or truncated") from exc
    elif isinstance(src, Image.Image):
        name = name or "<PIL image>"
        arr = _from_pil(src, name)
    elif isinstance(src, np.ndarray):
        name = name or "<array>"
        arr = src
    else:
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, bytes, PIL image or numpy array")
    return _validate(arr, name)


def _validate(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageError(f"{name}: image dtype is {arr.dtype}, expected uint8 (0-255)")
    if arr.size == 0:
        raise ImageError(f"{name}: image is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim != 3:
        raise ImageError(f"{name}: image has {arr.ndim} dimensions, expected H x W or H x W x 3")
    elif arr.shape[2] != 3:
        raise ImageError(f"{name}: image has {arr.shape[2]} channels, expected 1 (gray) or 3 (RGB)")
    if min(arr.shape[:2]) < 8:
        raise ImageError(f"{name}: image is too small ({arr.shape[0]} x {arr.shape[1]} pixels)")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class Geometry:
    """Where the model's square input came from in the original image (for mapping maps back)."""

    height: int  # original image
    width: int
    top: float  # crop window in original pixel coordinates
    left: float
    crop_height: float
    crop_width: float


@dataclass(frozen=True)
class Preprocess:
    """Geometry of pre-processing. ``crop=True``: resize the short side to size*256/224 and take
    the centre (the paper's setting); ``crop=False``: resize the whole image to size x size so that
    defects at the border stay in view."""

    size: int = 224
    crop: bool = True

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        Image = _pil()
        h, w = image.shape[:2]
        s = self.size
        pil = Image.fromarray(image)
        if not self.crop:
            out = pil.resize((s, s), Image.BILINEAR)
            return np.asarray(out), Geometry(h, w, 0.0, 0.0, float(h), float(w))
        short = round(s * 256 / 224)
        if h <= w:
            nh, nw = short, max(short, int(short * w / h))
        else:
            nh, nw = max(short, int(short * h / w)), short
        resized = pil.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        out = np.asarray(resized)[top : top + s, left : left + s]
        sy, sx = h / nh, w / nw
        return np.ascontiguousarray(out), Geometry(h, w, top * sy, left * sx, s * sy, s * sx)

    def to_dict(self) -> dict:
        return {"size": self.size, "crop": self.crop}


def map_to_original(score_map: np.ndarray, geom: Geometry) -> np.ndarray:
    """Resample a square score map onto the original image; pixels outside the crop get 0."""
    Image = _pil()
    out = np.zeros((geom.height, geom.width), np.float32)
    top, left = int(round(geom.top)), int(round(geom.left))
    ch = min(int(round(geom.crop_height)), geom.height - top)
    cw = min(int(round(geom.crop_width)), geom.width - left)
    resized = Image.fromarray(np.ascontiguousarray(score_map, dtype=np.float32)).resize((cw, ch), Image.BILINEAR)
    out[top : top + ch, left : left + cw] = np.asarray(resized)
    return out


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (sorted); raises if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
