"""PyTorch backbone -> ONNX feature extractor with pre-processing and description inside.

The graph takes ``image``: uint8 (N, S, S, 3), and does the cast, ImageNet-style normalisation and
NHWC -> NCHW itself, so an accelerator does them too. Outputs: one (N, C, h, w) float32 tensor
per pyramid level and the global (N, C) vector, named as the backbone's ``feature_info``.
The model's :class:`ModelInfo` goes into the ONNX metadata under ``spade_edge``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from spade_edge.runtime.fingerprint import stamp
from spade_edge.runtime.modelinfo import METADATA_KEY, ModelInfo

from .backbones import Backbone, FeatureInfo

OPSET = 18
MAX_BATCH = 256


class WithPreprocess(nn.Module):
    """uint8 NHWC in, the backbone's pyramid (as a tuple in ``feature_info`` order) out."""

    scale: torch.Tensor  # buffers
    shift: torch.Tensor

    def __init__(self, net: nn.Module, info: FeatureInfo):
        super().__init__()
        self.net, self.info = net, info
        std = torch.tensor(info.std) * 255.0
        self.register_buffer("scale", (1.0 / std).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(info.mean) * 255.0 / std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # cast first: TensorRT takes uint8 only as a network input feeding a Cast
        x = image.to(torch.float32).permute(0, 3, 1, 2) * self.scale + self.shift
        out = self.net(x)
        return tuple(out[n] for n in self.info.names())


def fingerprint(net: nn.Module, backbone: str, info: FeatureInfo) -> str:
    """SHA-256 of what determines the features: backbone, pyramid, normalisation, every weight."""
    h = hashlib.sha256(json.dumps([backbone, repr(info)]).encode())
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def model_info(net: Backbone, backbone: str) -> ModelInfo:
    info: FeatureInfo = net.feature_info
    return ModelInfo(
        backbone=backbone,
        input_size=info.input_size,
        levels=info.levels,
        global_name=info.global_name,
        global_channels=info.global_channels,
        mean=info.mean,
        std=info.std,
        fingerprint=fingerprint(net, backbone, info),
    )


def onnx_from_backbone(net: Backbone, backbone: str, out: str | os.PathLike, opset: int = OPSET) -> ModelInfo:
    """Export ``net`` (an eval-mode backbone with ``feature_info``) to ``out``; returns its description.

    The file is written atomically and checked with ``onnx.checker``.
    """
    import onnx

    info: FeatureInfo = net.feature_info
    meta = model_info(net, backbone)
    wrapper = WithPreprocess(net, info).eval()
    s = info.input_size
    dummy = torch.zeros(2, s, s, 3, dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter; problems surface as errors or in parity
        program = torch.onnx.export(
            wrapper,
            (dummy,),
            None,
            input_names=["image"],
            output_names=info.names(),
            opset_version=opset,
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}},
            dynamo=True,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter returns its program
    model = program.model_proto
    meta = stamp(model, meta)  # the digest the runtime recomputes at load (runtime/fingerprint.py)
    onnx.helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    model.doc_string = f"spade-edge feature extractor: {backbone}"
    onnx.checker.check_model(model, full_check=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return meta
