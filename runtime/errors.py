"""Errors the runtime raises: each names the problem and what to do about it."""


class SpadeError(Exception):
    """Base class of every error spade-edge raises on purpose."""


class ImageError(SpadeError, ValueError):
    """An input image cannot be used (bad type, dtype, shape, or undecodable file)."""


class GalleryError(SpadeError):
    """A gallery file is missing, corrupt, or of an unknown format."""


class ModelError(SpadeError):
    """A model file is missing or carries no spade-edge description."""


class MismatchError(SpadeError):
    """A model and a gallery that do not belong together."""


class MissingDependencyError(SpadeError, ImportError):
    """An optional package is needed for this path; the message names the extra."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` lazily, or explain which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module.split('.')[0]}', which is not installed: "
            f"pip install 'spade-edge[{extra}]'"
        ) from exc
