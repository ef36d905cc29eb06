"""Weight resolution, in one written order of priority:

1. an explicit file (``--weights PATH``) always wins;
2. ``"random"``: random initialisation (tests, timing) - never silent, it must be asked for;
3. the file a backbone ships with (a Python package, e.g. EfficientNet-Lite0);
4. torch's cache, ``$TORCH_HOME/hub/checkpoints/<file>`` (where torchvision keeps downloads);
5. a download into that cache, unless downloads are off.

A miss says exactly which file to put where.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import read_checkpoint

RANDOM = "random"


class WeightsNotFoundError(FileNotFoundError):
    """No usable weight file; the message says where to put one."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    spec: str | os.PathLike | None,
    *,
    backbone: str,
    url: str | None = None,
    packaged: Callable[[], Path | None] | None = None,
    download: bool = True,
    hint: str = "",
) -> Path | None:
    """A path to a state-dict file for ``backbone``, or None for random init (``spec="random"``)."""
    if spec == RANDOM:
        return None
    if spec is not None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} does not exist")
        return path
    if packaged is not None:
        found = packaged()
        if found is not None and found.is_file():
            return found
    if url is None:
        raise WeightsNotFoundError(f"no weights for {backbone}: {hint + ', or ' if hint else ''}pass --weights PATH")
    cached = hub_checkpoint_dir() / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    if download:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=True)  # a download, nothing loaded
        except Exception:  # offline, proxy, TLS...: fall through to the instructions below
            pass
        if cached.is_file():
            return cached
    raise WeightsNotFoundError(
        f"ImageNet weights for {backbone} not found. Download {url}\n"
        f"and put the file at {cached}\n"
        f"(or pass --weights PATH to a copy anywhere; set TORCH_HOME to move torch's cache)."
    )


def load_state_dict(path: Path) -> dict:
    """Tensors of an upstream checkpoint (torchvision's and the Lite0 package's .pth files are in
    torch's format), read by :func:`~.checkpoint.read_checkpoint`: no unpickling, nothing in the
    file can run. spade-edge's own artifacts (ONNX models, galleries, engine sidecars) are ONNX, raw
    arrays and JSON."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state
