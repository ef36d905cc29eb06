"""Image input: decode and validate anything a user may pass, and fit it to the model's input.

Only geometry happens here (resize, crop); dtype cast, normalisation and layout run in the model.

Decoded-pixel memory is bounded and predictable from the header (:func:`decode_cost`): an image
is decoded once at its own depth, a 16-bit or 32-bit one is brought to 8 bits in strips of a
quarter of a million pixels (integer arithmetic, no float64 copy), and a grey image is resized while still
grey and made RGB only at the model's input size (:func:`fit_image`). The result is the same,
bit for bit, as ``Preprocess(load_image(...))``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import ImageError

if TYPE_CHECKING:
    import PIL.Image

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, "PIL.Image.Image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # integer modes brought to 8 bits in strips
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_GREY_MODES = ("1", "F")  # converted to L (the same values as through RGB, a third of the memory)
# bytes per pixel of Pillow's storage of a decoded image, by mode (RGB is stored as 4 bytes)
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_STRIP_PIXELS = 1 << 18  # pixels per strip of the 16-bit -> 8-bit conversion


def _pil():
    from PIL import Image  # Pillow is a core dependency; imported here to keep import time low

    return Image


def decode_cost(mode: str, width: int, height: int, fmt: str | None = None) -> int:
    """Bytes of decoded pixels that :func:`fit_image` holds at its peak for an image whose header
    says ``mode`` and ``width`` x ``height`` (``fmt``: the file format): Pillow's storage of the
    decoded image, plus the 8-bit grey or RGB image it is converted to, plus the frame buffer of
    decoders that keep one (WebP). Known before a pixel is decoded, so a service can refuse first."""
    stored = _STORAGE.get(mode, 4)
    if mode in ("L", "RGB"):
        converted = 0
    elif mode in _DEEP_MODES or mode in _GREY_MODES:
        converted = 1
    else:  # P, CMYK, YCbCr, LAB, HSV ... -> RGB
        converted = 4
    frame = 12 if (fmt or "").upper() == "WEBP" else 0  # libwebp's frame, its copy as bytes and a reader's
    return int(width) * int(height) * (stored + converted + frame)


def _eight_bit(img, name: str):
    """A 16-bit or 32-bit integer image as 8-bit grey, in strips: the top 8 bits of the 16-bit
    range (rounded) when any pixel is over 255, else the values as they are; negative -> 0. The
    same values as ``clip(v * 255 / 65535 + 0.5, 0, 255)`` through float64, without the copies."""
    Image = _pil()
    img.load()
    w, h = img.size
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    try:
        hi = img.getextrema()[1] if w and h else 0
    except ValueError:  # modes Pillow has no extrema for (I;16B): the strips' maxima
        hi = max((int(np.asarray(img.crop((0, y, w, min(h, y + rows)))).max()) for y in range(0, h, rows)), default=0)
    scale = hi > 255
    out = Image.new("L", (w, h))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        a = np.array(img.crop((0, y0, w, y1)), dtype=np.int32)  # a writable copy; 65535 * 510 + 65535 fits
        if scale:
            np.clip(a, 0, 65535, out=a)
            a *= 510
            a += 65535
            a //= 131070  # floor(v * 255 / 65535 + 0.5): v / 257 is never exactly half-way
        else:
            np.clip(a, 0, 255, out=a)
        out.paste(Image.fromarray(a.astype(np.uint8)), (0, y0))
        del a
    return out


def _pil_8bit(img, name: str):
    """``img`` (Pillow, maybe not yet loaded) as an 8-bit L or RGB image, refusing alpha from the
    header (before any pixel is decoded). Converts with one extra copy at most."""
    mode = img.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        shown = "RGBA" if mode == "P" else mode
        raise ImageError(f"{name}: image has an alpha channel ({shown}); save it as RGB or grayscale")
    if mode in _DEEP_MODES:
        return _eight_bit(img, name)
    img.load()
    if mode in ("L", "RGB"):
        return img
    try:
        return img.convert("L" if mode in _GREY_MODES else "RGB")
    except Exception as exc:
        raise ImageError(f"{name}: unsupported image mode {mode!r}") from exc


def _check_size(w: int, h: int, name: str) -> None:
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image is empty (shape {(h, w)})")
    if min(w, h) < 8:
        raise ImageError(f"{name}: image is too small ({h} x {w} pixels)")


def _open_decoded(src: ImageLike, name: str | None):
    """(an 8-bit L or RGB Pillow image, name) for a path, bytes or Pillow image; errors name the
    problem. Arrays are not handled here."""
    Image = _pil()
    if isinstance(src, (str, os.PathLike)):
        name = name or str(src)
        if not Path(src).is_file():
            raise ImageError(f"{name}: no such image file")
        opener, what = (lambda: Image.open(src)), "cannot decode image ({}); the file is corrupt or truncated"
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        if len(src) == 0:
            raise ImageError(f"{name}: empty byte string")
        data = src if isinstance(src, bytes) else bytes(src)
        opener, what = (lambda: Image.open(io.BytesIO(data))), "cannot decode image bytes ({}); corrupt or truncated"
    else:
        name = name or "<PIL image>"
        return _pil_8bit(src, name), name
    try:
        with opener() as img:
            out = _pil_8bit(img, name)
            out.load()
            return out, name
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types for bad files
        raise ImageError(f"{name}: " + what.format(exc)) from exc


def load_image(src: ImageLike, name: str | None = None) -> np.ndarray:
    """Return ``src`` as a uint8 array of shape (H, W, 3).

    Accepts a path, encoded bytes, a PIL image, or a numpy array (H x W or H x W x 3, uint8).
    Grayscale is replicated to three channels. Anything else raises :class:`ImageError`
    naming the problem. To fit an image to a model, :func:`fit_image` gives the same pixels with
    less memory (no full-size RGB copy of a grey image).
    """
    if isinstance(src, np.ndarray):
        arr = _check_array(src, name or "<array>")
        return np.ascontiguousarray(_rgb(arr))
    if not isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)) and not _is_pil(src):
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, bytes, PIL image or numpy array")
    img, name = _open_decoded(src, name)
    w, h = img.size
    _check_size(w, h, name)
    return _rgb(np.asarray(img))


def fit_image(src: ImageLike, preprocess: Preprocess, name: str | None = None) -> tuple[np.ndarray, Geometry]:
    """``preprocess(load_image(src, name))``, with the decoded-pixel memory of :func:`decode_cost`:
    decoded once, resized at its own channel count, made RGB at the model's input size."""
    if not isinstance(preprocess, Preprocess):  # a caller's own pre-processing takes arrays
        return preprocess(load_image(src, name))
    if isinstance(src, np.ndarray):
        return preprocess(_check_array(src, name or "<array>"))
    if not isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)) and not _is_pil(src):
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, bytes, PIL image or numpy array")
    img, name = _open_decoded(src, name)
    w, h = img.size
    _check_size(w, h, name)
    return preprocess.fit(img)


def _is_pil(obj) -> bool:
    return isinstance(obj, _pil().Image)


def _rgb(arr: np.ndarray) -> np.ndarray:
    """H x W (grey) or H x W x 3 uint8 -> H x W x 3, without an intermediate copy."""
    if arr.ndim == 3:
        return arr
    out = np.empty((*arr.shape, 3), np.uint8)
    out[...] = arr[:, :, None]
    return out


def _check_array(arr: np.ndarray, name: str) -> np.ndarray:
    """A caller's array: uint8, H x W, H x W x 1 or H x W x 3, at least 8 pixels a side; returned
    as H x W (grey) or H x W x 3."""
    if arr.dtype != np.uint8:
        raise ImageError(f"{name}: image dtype is {arr.dtype}, expected uint8 (0-255)")
    if arr.size == 0:
        raise ImageError(f"{name}: image is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3):
        raise ImageError(f"{name}: image has {arr.ndim} dimensions, expected H x W or H x W x 3")
    if arr.ndim == 3 and arr.shape[2] != 3:
        raise ImageError(f"{name}: image has {arr.shape[2]} channels, expected 1 (gray) or 3 (RGB)")
    if min(arr.shape[:2]) < 8:
        raise ImageError(f"{name}: image is too small ({arr.shape[0]} x {arr.shape[1]} pixels)")
    return arr


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
        """Fit an H x W x 3 (or H x W grey) uint8 array: (S x S x 3 uint8, where it came from)."""
        return self.fit(_pil().fromarray(image))

    def fit(self, img) -> tuple[np.ndarray, Geometry]:
        """The same for an 8-bit L or RGB Pillow image. A grey one is resized grey and made RGB at
        the model's input size: the same pixels as through a full-size RGB copy (Pillow resizes
        each band alike), a third of the memory."""
        Image = _pil()
        w, h = img.size
        s = self.size
        if not self.crop:
            out = np.asarray(img.resize((s, s), Image.BILINEAR))
            return _rgb(out), Geometry(h, w, 0.0, 0.0, float(h), float(w))
        short = round(s * 256 / 224)
        if h <= w:
            nh, nw = short, max(short, int(short * w / h))
        else:
            nh, nw = max(short, int(short * h / w)), short
        resized = img.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        out = np.asarray(resized)[top : top + s, left : left + s]
        sy, sx = h / nh, w / nw
        return np.ascontiguousarray(_rgb(out)), Geometry(h, w, top * sy, left * sx, s * sy, s * sx)

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
