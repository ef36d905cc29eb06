"""Reading .pth checkpoints without unpickling: the same tensors torch.load gives, and nothing run."""

import pickle

import pytest
import torch

from spade_edge.export.checkpoint import UnsafeCheckpointError, read_checkpoint


@pytest.mark.parametrize("zip_format", [True, False])
def test_same_tensors_as_torch_in_both_layouts(tmp_path, zip_format):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {
        "w": torch.randn(4, 3, 3, 3, generator=g),
        "t": base.t(),  # non-contiguous
        "s": base[2:4],  # a view at a storage offset, sharing base's storage
        "base": base,
        "h": torch.randn(7, generator=g).half(),
        "bf": torch.randn(5, generator=g).bfloat16(),
        "n": torch.tensor([3, -1], dtype=torch.int64),
        "b": torch.tensor([True, False]),
    }
    path = tmp_path / "c.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    ours = read_checkpoint(path)
    assert list(ours) == list(state)
    for k, v in state.items():
        want = v.float() if v.dtype == torch.bfloat16 else v
        assert ours[k].dtype == want.dtype and torch.equal(ours[k], want), k


def test_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(2), "y": Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"\.print, which a state dict never needs"):
        read_checkpoint(path)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeCheckpointError, match="not a torch checkpoint"):
        read_checkpoint(raw)
