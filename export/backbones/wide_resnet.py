"""Wide-ResNet50x2 (torchvision, ImageNet IMAGENET1K_V1): SPADE's backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from spade_edge.runtime.modelinfo import Level

from ..weights import load_state_dict, resolve_weights
from .base import Backbone, FeatureInfo

if TYPE_CHECKING:
    from torchvision.models import ResNet

FEATURE_INFO = FeatureInfo(
    levels=(Level("layer1", 256, 4), Level("layer2", 512, 8), Level("layer3", 1024, 16)),
    global_name="global",
    global_channels=2048,
)


class WideResNetPyramid(Backbone):
    """layer1-3 feature maps and the average-pooled layer4 vector."""

    feature_info = FEATURE_INFO

    def __init__(self, net: ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        l1 = self.layer1(self.stem(x))
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        g = self.layer4(l3).mean(dim=(2, 3))
        return {"layer1": l1, "layer2": l2, "layer3": l3, "global": g}


def wide_resnet50_2(weights: str | None = None, download: bool = True) -> WideResNetPyramid:
    from torchvision.models import Wide_ResNet50_2_Weights
    from torchvision.models import wide_resnet50_2 as tv_wrn

    path = resolve_weights(
        weights, backbone="wide_resnet50_2", url=Wide_ResNet50_2_Weights.IMAGENET1K_V1.url, download=download
    )
    net = tv_wrn(weights=None)
    if path is not None:
        net.load_state_dict(load_state_dict(path))
    return WideResNetPyramid(net).eval()
