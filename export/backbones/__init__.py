"""Backbones: name -> constructor returning an ``nn.Module`` whose forward gives the pyramid dict
and whose ``feature_info`` declares it."""

from __future__ import annotations

from collections.abc import Callable

from .base import Backbone, FeatureInfo
from .efficientnet_lite import efficientnet_lite0
from .wide_resnet import wide_resnet50_2

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "wide_resnet50_2": wide_resnet50_2,
    "efficientnet_lite0": efficientnet_lite0,
}
ALIASES = {"wrn50x2": "wide_resnet50_2", "wrn50_2": "wide_resnet50_2", "lite0": "efficientnet_lite0"}


def canonical_name(name: str) -> str:
    """The registry name of backbone ``name`` (aliases resolved); raises on unknown names."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)} (aliases {sorted(ALIASES)})")
    return key


def create_backbone(name: str, weights: str | None = None, download: bool = True) -> Backbone:
    """Build backbone ``name`` in eval mode. ``weights``: a file path, ``"random"``, or None for
    the backbone's default ImageNet weights (see :mod:`spade_edge.export.weights`)."""
    return BACKBONES[canonical_name(name)](weights=weights, download=download)


__all__ = ["BACKBONES", "Backbone", "FeatureInfo", "canonical_name", "create_backbone"]
