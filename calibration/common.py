"""Shared by the reduced-precision writers: the model description travels with the model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from spade_edge.runtime.fingerprint import stamp
from spade_edge.runtime.modelinfo import METADATA_KEY, ModelInfo


def read_info(model) -> ModelInfo:
    """The spade-edge description of an ``onnx.ModelProto``."""
    return ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props})


def save_with_info(model, info: ModelInfo, precision: str, details: dict, out: str | os.PathLike) -> ModelInfo:
    """Write ``model`` atomically with ``info`` re-labelled: same fingerprint (the float weights it
    came from: one family), new precision, and how it was made."""
    import onnx

    new = dataclasses.replace(info, precision=precision, extra={**info.extra, "calibration": details})
    new = stamp(model, new)  # this file's own weights digest (runtime/fingerprint.py)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: new.to_json()})
    onnx.checker.check_model(model)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.part")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return new
