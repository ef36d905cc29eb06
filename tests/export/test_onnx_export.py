import json

import numpy as np
import onnx
import pytest
import torch

from spade_edge.export.backbones import create_backbone
from spade_edge.export.onnx_export import onnx_from_backbone
from spade_edge.export.parity import compare_with_torch
from spade_edge.runtime.features import backend_from_model
from spade_edge.runtime.modelinfo import ModelInfo


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def wrn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = create_backbone("wide_resnet50_2", weights="random")
    path = tmp_path_factory.mktemp("wrn") / "wrn.onnx"
    info = onnx_from_backbone(net, "wide_resnet50_2", path)
    return net, path, info


def test_wrn_parity(wrn_onnx):
    net, path, _ = wrn_onnx
    result = compare_with_torch(net, path, images(2))
    print(result)
    assert result and [d.name for d in result.diffs] == ["layer1", "layer2", "layer3", "global"]
    assert all(d.max_rel < 1e-4 for d in result.diffs)


def test_lite0_parity_on_real_images(lite0, lite0_onnx, elpv_normal):
    from spade_edge.runtime.images import Preprocess, load_image

    x = np.stack([Preprocess()(load_image(p))[0] for p in elpv_normal[:3]])
    result = compare_with_torch(lite0, lite0_onnx, x)
    print(result)
    assert result and all(d.max_rel < 1e-4 for d in result.diffs)


def test_model_is_clean_and_describes_itself(wrn_onnx):
    _, path, info = wrn_onnx
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    read = ModelInfo.from_json(meta["spade_edge"])
    assert read == info and read.backbone == "wide_resnet50_2" and read.fingerprint.startswith("sha256:")
    assert json.loads(meta["spade_edge"])["mean"] == pytest.approx([0.485, 0.456, 0.406])
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # pre-processing is in the graph
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_dynamic_batch_and_backend_outputs(wrn_onnx):
    _, path, info = wrn_onnx
    backend = backend_from_model(path)
    for n in (1, 3):
        out = backend(images(n, seed=n))
        assert out["layer1"].shape == (n, 256, 56, 56) and out["layer3"].shape == (n, 1024, 14, 14)
        assert out["global"].shape == (n, 2048)
    a = backend(images(3, seed=3))["global"]
    b = backend(images(3, seed=3)[1:2])["global"]
    np.testing.assert_allclose(a[1:2], b, rtol=1e-4, atol=1e-5)  # batching does not change an image's features


def test_fingerprint_follows_the_weights(lite0):
    from spade_edge.export.onnx_export import model_info

    a = model_info(lite0, "efficientnet_lite0").fingerprint
    torch.manual_seed(0)
    b = model_info(create_backbone("efficientnet_lite0", weights="random"), "efficientnet_lite0").fingerprint
    assert a == model_info(lite0, "efficientnet_lite0").fingerprint and a != b
