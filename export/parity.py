"""Compare an exported model with its PyTorch source on the same uint8 images."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import Backbone
from .onnx_export import WithPreprocess


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / max |b|: scale-free, robust to near-zero entries

    def __str__(self) -> str:
        return f"{self.name:>10}: max abs {self.max_abs:.3e}  rel {self.max_rel:.3e}"


@dataclass
class Parity:
    """Truthy when every output agrees within ``rtol`` (relative to the output's largest magnitude)."""

    diffs: list[OutputDiff]
    rtol: float

    def __bool__(self) -> bool:
        return all(d.max_rel <= self.rtol for d in self.diffs)

    def __str__(self) -> str:
        verdict = "PASS" if self else "FAIL"
        return "\n".join([f"parity vs PyTorch ({verdict}, rtol {self.rtol:g}):", *map(str, self.diffs)])


def compare_with_torch(net: Backbone, onnx_path: str | os.PathLike, images: np.ndarray, rtol: float = 1e-4) -> Parity:
    """Run ``images`` (N, S, S, 3 uint8) through PyTorch and ONNX Runtime and compare every output."""
    import onnxruntime as ort

    wrapper = WithPreprocess(net, net.feature_info).eval()
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(torch.from_numpy(images))]
    sess = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": images})
    diffs = []
    for name, a, b in zip(net.feature_info.names(), got, ref):
        err = float(np.abs(a - b).max())
        diffs.append(OutputDiff(name, err, err / max(float(np.abs(b).max()), 1e-12)))
    return Parity(diffs, rtol)
