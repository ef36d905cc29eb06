"""What every backbone declares: its pyramid as plain data (as timm's ``feature_info``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from spade_edge.runtime.modelinfo import Level

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureInfo:
    """The pyramid a backbone returns: pixel levels (name, channels, stride) and the global vector."""

    levels: tuple[Level, ...]
    global_name: str
    global_channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224

    def names(self) -> list[str]:
        return [lv.name for lv in self.levels] + [self.global_name]


class Backbone(nn.Module):
    """A backbone: its forward gives the pyramid dict, its ``feature_info`` declares it."""

    feature_info: FeatureInfo
