"""Shared fixtures: real models exported once per session, tiny hand-made ones, random galleries."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.gallery import Gallery
from spade_edge.runtime.modelinfo import Level, ModelInfo


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its real ImageNet weights."""
    from spade_edge.export.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def lite0_onnx(lite0, tmp_path_factory):
    from spade_edge.export.onnx_export import onnx_from_backbone

    path = tmp_path_factory.mktemp("models") / "lite0.onnx"
    onnx_from_backbone(lite0, "efficientnet_lite0", path)
    return path


@pytest.fixture(scope="session")
def elpv_normal():
    from spade_edge.datasets import elpv_cells

    cells = elpv_cells(0.0, "mono")
    np.random.default_rng(1).shuffle(cells)
    return cells


def make_info(levels=(("a", 5, 4), ("b", 7, 8)), global_channels=6, size=32, fingerprint="sha256:test") -> ModelInfo:
    return ModelInfo(
        backbone="toy",
        input_size=size,
        levels=tuple(Level(*lv) for lv in levels),
        global_name="global",
        global_channels=global_channels,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        fingerprint=fingerprint,
    )


def random_gallery(info: ModelInfo, n: int, rng: np.random.Generator) -> Gallery:
    levels = {lv.name: rng.normal(size=(n, *info.grid(lv), lv.channels)).astype(np.float32) for lv in info.levels}
    glob = rng.normal(size=(n, info.global_channels)).astype(np.float32)
    manifest = {"model": {"backbone": info.backbone, "fingerprint": info.fingerprint}, "thresholds": {}}
    return Gallery.from_arrays([f"img{i:03d}.png" for i in range(n)], glob, levels, manifest)


def random_features(info: ModelInfo, rng: np.random.Generator) -> dict[str, np.ndarray]:
    f = {lv.name: rng.normal(size=(lv.channels, *info.grid(lv))).astype(np.float32) for lv in info.levels}
    f[info.global_name] = rng.normal(size=info.global_channels).astype(np.float32)
    return f


def tiny_onnx(path, size=32, fingerprint="sha256:tiny"):
    """A hand-made few-hundred-byte feature extractor with spade-edge metadata: average pools
    of the normalised image as pyramid levels (enough to test runners and the detector)."""
    import onnx
    from onnx import TensorProto, helper

    info = make_info(levels=(("a", 3, 4), ("b", 3, 8)), global_channels=3, size=size, fingerprint=fingerprint)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["t", "scale"], ["x"]),
        helper.make_node("AveragePool", ["x"], ["a"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("GlobalAveragePool", ["x"], ["g4"]),
        helper.make_node("Flatten", ["g4"], ["global"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, size // 4, size // 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, size // 8, size // 8]),
            helper.make_tensor_value_info("global", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {"spade_edge": info.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return info
