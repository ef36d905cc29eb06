"""A model is what export wrote, or refused (issue 17): the digest of its graph (every node and
weight) and description, recomputed at load without onnx or torch; metadata that does not parse is
a clear error naming the file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from spade_edge.runtime import fingerprint
from spade_edge.runtime.errors import ModelError
from spade_edge.runtime.modelinfo import METADATA_KEY, model_info_from_onnx

from ..conftest import make_info, random_gallery, tiny_onnx


def conv_onnx(path, stamped: bool = True, seed: int = 0):
    """A few-kB model with real weights (a 3x3 convolution per level), as export writes one: with
    its digest stamped by the function export uses (runtime/fingerprint.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    info = make_info(levels=(("a", 4, 4), ("b", 4, 8)), global_channels=4, size=32, fingerprint="sha256:conv")
    w = rng.normal(0, 0.05, (4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c"], ["a"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("AveragePool", ["c"], ["b"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("GlobalAveragePool", ["c"], ["g4"]),
        helper.make_node("Flatten", ["g4"], ["global"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 32, 32, 3])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 8, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 4, 4]),
            helper.make_tensor_value_info("global", TensorProto.FLOAT, ["N", 4]),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if stamped:
        info = fingerprint.stamp(model, info)
    onnx.helper.set_model_props(model, {METADATA_KEY: info.to_json()})
    onnx.save(model, str(path))
    return info, w


def flip_weight_exponent(src, dst, weights: np.ndarray):
    """``src`` with one exponent bit of the first element of ``weights`` flipped, as ``dst``."""
    data = bytearray(src.read_bytes())
    at = bytes(data).find(weights.tobytes())
    assert at > 0
    data[at + 3] ^= 0x40  # bit 30: the top exponent bit of a little-endian float32
    dst.write_bytes(bytes(data))


def metadata_span(data: bytes) -> tuple[int, int]:
    """Where the spade-edge JSON sits in a model file."""
    start = data.find(b'{"backbone"')
    assert start > 0
    return start, data.index(b"}", data.index(b'"std"', start)) + 1


# -- the cases, on a real exported model -------------------------------------------------------


def _lite0_weights(path):
    import onnx

    model = onnx.load(str(path))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    return np.frombuffer(big.raw_data, np.float32)


def test_a_flipped_weight_bit_is_refused(lite0_onnx, tmp_path):
    """Before: the model loaded silently and scored differently."""
    from spade_edge.runtime.features import backend_from_model

    bad = tmp_path / "flipped.onnx"
    flip_weight_exponent(lite0_onnx, bad, _lite0_weights(lite0_onnx)[:4])
    with pytest.raises(ModelError, match="digest") as err:
        backend_from_model(bad, "cpu")
    assert str(bad) in str(err.value)
    with pytest.raises(ModelError, match="digest"):
        model_info_from_onnx(bad)
    backend_from_model(lite0_onnx, "cpu").close()  # the original loads


def test_gallery_verify_with_a_flipped_model_fails(lite0_onnx, tmp_path):
    """Before: 'gallery verify -m' said 'model matches'."""
    from click.testing import CliRunner

    from spade_edge.cli import main

    info = model_info_from_onnx(lite0_onnx)
    gallery = random_gallery(info, 2, np.random.default_rng(0)).save(tmp_path / "g.gallery")
    runner = CliRunner()
    res = runner.invoke(main, ["gallery", "verify", str(gallery), "-m", str(lite0_onnx)])
    assert res.exit_code == 0 and "model matches" in res.output, res.output
    bad = tmp_path / "flipped.onnx"
    flip_weight_exponent(lite0_onnx, bad, _lite0_weights(lite0_onnx)[:4])
    res = runner.invoke(main, ["gallery", "verify", str(gallery), "-m", str(bad)])
    assert res.exit_code == 1 and "model matches" not in res.output and "digest" in res.output, res.output


@pytest.mark.parametrize(
    "old, new",
    [
        (b'{"backbone"', b'{"backbmne"'),
        (b'"stride": 4', b'"stride": "'),
        (b'"levels": [', b'"levels": {'),
        (b'"std": [', b'"std": 5'),
    ],
)
def test_a_flip_in_the_metadata_is_a_clear_error(lite0_onnx, tmp_path, old, new):
    """Before: a bare TypeError (or KeyError, ValueError) without the file name."""
    from spade_edge.runtime.features import backend_from_model

    data = lite0_onnx.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    bad = tmp_path / "meta.onnx"
    bad.write_bytes(data.replace(old, new))
    for load in (model_info_from_onnx, lambda p: backend_from_model(p, "cpu")):
        with pytest.raises(ModelError) as err:
            load(bad)
        assert str(bad) in str(err.value), err.value


def test_export_stamps_a_digest_that_survives_a_resave(lite0_onnx, tmp_path):
    import onnx

    info = model_info_from_onnx(lite0_onnx)
    assert info.extra[fingerprint.WEIGHTS_KEY].startswith("sha256:")
    again = tmp_path / "resaved.onnx"
    onnx.save(onnx.load(str(lite0_onnx)), str(again))  # re-serialised by the onnx package
    assert model_info_from_onnx(again) == info


def test_a_calibrated_model_carries_its_own_digest(lite0_onnx, tmp_path):
    from spade_edge.calibration.fp16 import fp16_from_onnx

    info = fp16_from_onnx(lite0_onnx, tmp_path / "half.onnx")
    read = model_info_from_onnx(tmp_path / "half.onnx")
    assert read == info and read.precision == "fp16"
    assert read.fingerprint == model_info_from_onnx(lite0_onnx).fingerprint  # one family
    assert read.extra["weights"] != model_info_from_onnx(lite0_onnx).extra["weights"]  # other weights


NO_ONNX_NO_TORCH = """
import sys
sys.modules["onnx"] = sys.modules["torch"] = None  # importing either now fails
from spade_edge.runtime.fingerprint import check_model_file
print(check_model_file(sys.argv[1]).extra["weights"])
"""


def test_the_runtime_recomputes_without_onnx_or_torch(lite0_onnx):
    res = subprocess.run(
        [sys.executable, "-c", NO_ONNX_NO_TORCH, str(lite0_onnx)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == model_info_from_onnx(lite0_onnx).extra["weights"]


# -- small models: every case, fast ------------------------------------------------------------------


def test_the_digest_covers_weights_graph_and_description(tmp_path):
    path = tmp_path / "m.onnx"
    info, w = conv_onnx(path)
    assert fingerprint.check_model_file(path) == info
    flip_weight_exponent(path, tmp_path / "w.onnx", w)
    data = path.read_bytes()
    cases = {
        "w.onnx": None,
        "pads.onnx": data.replace(b"pads", b"padz"),  # a node's attribute
        "stride.onnx": data.replace(b'"stride": 8', b'"stride": 2'),  # the description
        "fp.onnx": data.replace(b"sha256:conv", b"sha256:cpnv"),
    }
    for name, content in cases.items():
        if content is not None:
            assert content != data
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelError, match="digest"):
            fingerprint.check_model_file(tmp_path / name)


def test_every_bit_flip_in_the_metadata_is_refused_or_harmless(tmp_path):
    path = tmp_path / "m.onnx"
    info, _ = conv_onnx(path)
    data = path.read_bytes()
    start, end = metadata_span(data)
    outcomes = {"refused": 0, "harmless": 0}
    for i in range(start, end):
        for bit in range(8):
            buf = bytearray(data)
            buf[i] ^= 1 << bit
            try:
                got = fingerprint.check_model_bytes(bytes(buf), "m.onnx")
            except ModelError as exc:
                assert "m.onnx" in str(exc)
                outcomes["refused"] += 1
            else:  # e.g. a flip in JSON white space: the same description
                assert got == info
                outcomes["harmless"] += 1
    print(f"metadata bit flips: {outcomes}")
    assert outcomes["refused"] > 0.99 * 8 * (end - start)


def test_a_damaged_digest_key_is_not_a_model_without_digest(tmp_path):
    """One flip in the key's name, one in a weight: without this the model would pass as exported
    before digests (the fuzz test found it)."""
    path = tmp_path / "m.onnx"
    _, w = conv_onnx(path)
    flip_weight_exponent(path, path, w)
    data = path.read_bytes()
    assert data.count(b'"weights"') == 1
    path.write_bytes(data.replace(b'"weights"', b'"weighTs"'))
    with pytest.raises(ModelError, match="another name"):
        fingerprint.check_model_file(path)


def test_a_model_without_a_digest_is_accepted_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.onnx"
    info = tiny_onnx(path)  # as exported before digests
    with caplog.at_level(logging.WARNING, logger="spade_edge.runtime.fingerprint"):
        assert fingerprint.check_model_file(path) == info
    assert "no weights digest" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"\x08\x07\x12", "not an ONNX model"),
        (b"\x0a\xff\xff\xff\xff\x0f", "not an ONNX model"),
    ],
)
def test_files_that_are_no_model(tmp_path, content, message):
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message) as err:
        fingerprint.check_model_file(path)
    assert str(path) in str(err.value)


def test_truncated_model_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    conv_onnx(path)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20):
        (tmp_path / "t.onnx").write_bytes(data[:cut])
        with pytest.raises(ModelError, match="t.onnx"):
            fingerprint.check_model_file(tmp_path / "t.onnx")


def test_the_check_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    info, w = conv_onnx(path)
    calls = []
    real = fingerprint._graph_hash
    monkeypatch.setattr(fingerprint, "_graph_hash", lambda *a: calls.append(1) or real(*a))
    fingerprint.check_model_file(path)
    fingerprint.check_model_file(path)
    assert len(calls) == 1
    flip_weight_exponent(path, tmp_path / "w.onnx", w)
    os.replace(tmp_path / "w.onnx", path)  # another file at the same path
    with pytest.raises(ModelError, match="digest"):
        fingerprint.check_model_file(path)
    data = bytearray(path.read_bytes())
    st = path.stat()
    data[bytes(data).find(b"conv")] ^= 0x01  # same size, mtime put back: the inode's ctime still moves
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelError):
        fingerprint.check_model_file(path)


def test_description_parse_errors_name_the_field(tmp_path):
    from spade_edge.runtime.modelinfo import ModelInfo

    good = json.loads(make_info().to_json())
    for change, field in [
        ({"input_size": 0}, "input_size"),
        ({"levels": []}, "levels"),
        ({"std": [1, 0, 1]}, "std"),
        ({"mean": [1, 2]}, "mean"),
        ({"format": 2}, "format"),
        ({"fingerprint": 5}, "fingerprint"),
        ({"surprise": 1}, "surprise"),
        ({"levels": [{"name": "a", "channels": 5}]}, "stride"),
        ({"global_channels": True}, "global_channels"),
        ({"extra": []}, "extra"),
    ]:
        with pytest.raises(ModelError, match=field) as err:
            ModelInfo.from_json(json.dumps({**good, **change}), source="m.onnx")
        assert "m.onnx" in str(err.value)
    for text in ("", "[]", "{", "1e999999"):
        with pytest.raises(ModelError, match="m.onnx"):
            ModelInfo.from_json(text, source="m.onnx")


@pytest.mark.parametrize(
    "change",
    [
        {"global_name": "glob"},
        {"input_name": "pixels"},
        {"levels": [{"name": "a", "channels": 4, "stride": 4}, {"name": "c", "channels": 4, "stride": 8}]},
    ],
)
def test_a_description_that_does_not_match_the_graph_is_refused(tmp_path, change):
    """Even with a valid digest (re-stamped): a level or global vector the graph does not produce
    would be a KeyError at inference."""
    import dataclasses as dc

    import onnx

    from spade_edge.runtime.modelinfo import Level

    path = tmp_path / "m.onnx"
    info, _ = conv_onnx(path)
    if "levels" in change:
        change = {"levels": tuple(Level(**lv) for lv in change["levels"])}
    model = onnx.load(str(path))
    crafted = fingerprint.stamp(model, dc.replace(info, **change))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: crafted.to_json()})
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="does not match its graph"):
        fingerprint.check_model_file(path)
