import pytest
import torch

from spade_edge.export.backbones import BACKBONES, canonical_name, create_backbone
from spade_edge.export.weights import WeightsNotFoundError
from spade_edge.runtime.images import Preprocess


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return create_backbone("wide_resnet50_2", weights="random")


def check_declared_pyramid(net):
    info = net.feature_info
    with torch.no_grad():
        out = net(torch.zeros(2, 3, info.input_size, info.input_size))
    assert list(out) == info.names()
    for lv in info.levels:
        assert out[lv.name].shape == (2, lv.channels, info.input_size // lv.stride, info.input_size // lv.stride)
    assert out[info.global_name].shape == (2, info.global_channels)


def test_wrn_pyramid_matches_its_declaration(wrn):
    check_declared_pyramid(wrn)
    assert [(lv.name, lv.channels, lv.stride) for lv in wrn.feature_info.levels] == [
        ("layer1", 256, 4),
        ("layer2", 512, 8),
        ("layer3", 1024, 16),
    ]


def test_lite0_pyramid_matches_its_declaration(lite0):
    check_declared_pyramid(lite0)
    assert [(lv.channels, lv.stride) for lv in lite0.feature_info.levels] == [(24, 4), (40, 8), (112, 16)]


def test_lite0_real_weights_see_a_cat(lite0):
    from skimage.data import chelsea  # a photo of a tabby cat

    x, _ = Preprocess(224)(chelsea())
    info = lite0.feature_info
    t = (
        torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)
    ) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = lite0.classify(t).softmax(1)[0]
    cats = probs[281:286].sum().item()  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert 281 <= int(probs.argmax()) <= 285 and cats > 0.8


def test_missing_wrn_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("wrn50x2", download=False)
    msg = str(err.value)
    expected = tmp_path / "hub" / "checkpoints" / "wide_resnet50_2-95faca4d.pth"
    assert str(expected) in msg and "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth" in msg
    assert "--weights" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_backbone("wrn50x2", weights=str(tmp_path / "nope.pth"))


def test_wrn_loads_from_torch_cache_and_explicit_file(tmp_path, monkeypatch, wrn):
    # the real loader, with a (random) state dict placed where torchvision keeps its downloads
    from torchvision.models import wide_resnet50_2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    ref = wide_resnet50_2()
    ckpt = tmp_path / "hub" / "checkpoints" / "wide_resnet50_2-95faca4d.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt)
    for weights in (None, str(ckpt)):
        net = create_backbone("wide_resnet50_2", weights=weights, download=False)
        assert torch.equal(net.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)


def test_backbone_names():
    assert canonical_name("lite0") == "efficientnet_lite0" and set(BACKBONES) >= {"wide_resnet50_2"}
    with pytest.raises(ValueError, match="unknown backbone"):
        canonical_name("resnet18")
