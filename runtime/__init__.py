"""The lean runtime: numpy + ONNX Runtime (or TensorRT) + a pixel scorer. Never imports torch."""

from .detector import Detector, Prediction
from .errors import GalleryError, ImageError, MismatchError, ModelError, SpadeError
from .gallery import Gallery
from .images import Preprocess, load_image
from .spade import SpadeConfig

__all__ = [
    "Detector",
    "Prediction",
    "Gallery",
    "Preprocess",
    "SpadeConfig",
    "load_image",
    "SpadeError",
    "ImageError",
    "GalleryError",
    "ModelError",
    "MismatchError",
]
