"""A model's digest, recomputed from the file at every load: the model is what export wrote, or it is
refused.

``ModelInfo.fingerprint`` names a model family (the float weights export started from: a calibrated
fp16 or int8 model keeps it, so a gallery knows its model). It cannot be recomputed from an ONNX
file: export folds batch norms into the convolutions and calibration rewrites the weights. So the
writer of every model file (``spade-edge export``, calibration) also records, in
``extra["weights"]``, the SHA-256 of what the file computes with:

- the top-level ``graph`` (every node, every initializer: all weights), ``opset_import`` and
  ``functions`` fields of the ONNX ``ModelProto``, each as its field number, length and bytes, and
- the spade-edge description itself (canonical JSON, this key left out),

and :func:`check_model_file` recomputes it when the model is opened, from the protobuf wire format
(memory-mapped; neither the onnx package nor torch is needed). A flipped weight bit, an edited node
or an edited description is refused with the file's name; a model written before digests existed
is accepted with a logged warning (one whose digest key is damaged, a digest under another name, is
refused). The metadata entry that carries the digest sits outside the hashed fields; re-saving a
model with the onnx package keeps the digest valid.

The description must also name the graph's real input and outputs (a level or global vector the
graph does not produce is refused here, not a KeyError at inference).

Cost, one SHA-256 pass over the weights (measured with ``python -m spade_edge.runtime.fingerprint``,
docs/gallery-format.md): about 8-12 ms for EfficientNet-Lite0 (13.6 MB) and 140-230 ms for
WideResNet50-2 (267 MB) on an x86 server core, against 120 and 890 ms to open their ONNX Runtime
sessions. A check that passed is kept for the process, keyed by the file's device, inode, size,
modification and change times and a hash of its first and last 64 KiB: reloads and a second
detector on the same file skip it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import re
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .errors import ModelError
from .modelinfo import METADATA_KEY, ModelInfo, _fields

WEIGHTS_KEY = "weights"  # in ModelInfo.extra: "sha256:<hex>"
DIGEST_FIELDS = (7, 8, 25)  # ModelProto: graph, opset_import, functions
_DOMAIN = b"spade-edge model digest 1\n"
_CHUNK = 8 << 20
_SAMPLE = 64 << 10
_CACHE_SIZE = 32
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")

log = logging.getLogger(__name__)
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def _graph_hash(buf) -> tuple[Any, dict[str, str], dict[str, list[str]]]:
    """One pass over the top-level fields of a serialized ``ModelProto``: the SHA-256 state after the
    digested fields, ``metadata_props`` (field 14) as a dict, and the names of the graph's inputs and
    outputs (``GraphProto`` fields 11 and 12, each ``ValueInfoProto``'s field 1)."""
    h = hashlib.sha256(_DOMAIN)
    props: dict[str, str] = {}
    io: dict[str, list[str]] = {"inputs": [], "outputs": []}
    with memoryview(buf) as view:
        for number, a, b in _fields(view, 0, len(view)):
            if number in DIGEST_FIELDS:
                h.update(f"{number}:{b - a}\n".encode())
                for s in range(a, b, _CHUNK):
                    h.update(view[s : min(b, s + _CHUNK)])  # hashlib releases the GIL on large blocks
            elif number == 14:
                entry = {k: bytes(view[s:e]).decode() for k, s, e in _fields(view, a, b)}
                props[entry.get(1, "")] = entry.get(2, "")
            if number == 7:
                for field, c, d in _fields(view, a, b):  # nodes and weights are skipped, not read
                    if field in (11, 12):
                        name = next((bytes(view[x:y]).decode() for f, x, y in _fields(view, c, d) if f == 1), "")
                        io["inputs" if field == 11 else "outputs"].append(name)
    return h, props, io


def _finish(h, description: dict) -> str:
    """The digest: the graph hash state ``h`` (copied) plus the canonical description without its digest."""
    d = dict(description)
    d["extra"] = {k: v for k, v in (d.get("extra") or {}).items() if k != WEIGHTS_KEY}
    h = h.copy()
    h.update(b"description\n" + json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    return "sha256:" + h.hexdigest()


def stamp(model, info: ModelInfo) -> ModelInfo:
    """``info`` with the digest of ``model`` (an ``onnx.ModelProto``, or its serialized bytes) and of
    ``info`` itself in ``extra["weights"]``: what a writer of a model file records in its metadata
    (``onnx.save`` serializes the proto as ``SerializeToString`` does; the metadata is not hashed)."""
    buf = model if isinstance(model, (bytes, bytearray, memoryview)) else model.SerializeToString()
    base = dataclasses.replace(info, extra={k: v for k, v in info.extra.items() if k != WEIGHTS_KEY})
    h, _, _ = _graph_hash(buf)
    return dataclasses.replace(info, extra={**base.extra, WEIGHTS_KEY: _finish(h, json.loads(base.to_json()))})


def check_model_bytes(buf, source: str = "model") -> ModelInfo:
    """The checked :class:`ModelInfo` of the serialized ONNX model ``buf`` (``source`` names it in errors)."""
    try:
        h, props, io = _graph_hash(buf)
    except UnicodeDecodeError as exc:
        raise ModelError(
            f"{source}: the model's ONNX metadata is not UTF-8 text ({exc}); the file is damaged: "
            "re-export the model or restore it"
        ) from exc
    except (ValueError, IndexError) as exc:
        raise ModelError(f"{source}: not an ONNX model ({exc})") from exc
    info = ModelInfo.from_metadata(props, source)  # every field checked, errors name the file
    missing = [n for n in [lv.name for lv in info.levels] + [info.global_name] if n not in io["outputs"]]
    if info.input_name not in io["inputs"] or missing:
        raise ModelError(
            f"{source}: the model's description does not match its graph: it names input "
            f"{info.input_name!r} and outputs {missing or 'as given'}, the graph has inputs "
            f"{io['inputs'][:5]} and outputs {io['outputs'][:8]}; re-export the model"
        )
    stored = info.extra.get(WEIGHTS_KEY)
    if stored is None and any(isinstance(v, str) and _DIGEST.match(v) for v in info.extra.values()):
        raise ModelError(
            f"{source}: the model's description carries a digest under another name than "
            f"'{WEIGHTS_KEY}': the file is damaged or was altered; re-export the model or restore a copy"
        )
    if stored is None:
        log.warning(
            "%s carries no weights digest (exported before spade-edge recorded one): its weights cannot be "
            "checked; re-export it with 'spade-edge export'",
            source,
        )
        return info
    try:
        got = _finish(h, json.loads(props[METADATA_KEY]))
    except ValueError as exc:  # a non-finite number in 'extra'
        raise ModelError(f"{source}: the model's spade-edge description cannot be digested ({exc})") from exc
    if got != stored:
        raise ModelError(
            f"{source}: the model is not what was exported: the digest of its weights, graph and description "
            f"({got[:23]}...) differs from the one recorded in it ({str(stored)[:23]}...); the file is damaged or "
            "was altered: re-export the model or restore a copy"
        )
    return info


def _key(f, st: os.stat_result) -> tuple:
    f.seek(0)
    h = hashlib.blake2b(f.read(_SAMPLE), digest_size=16)
    f.seek(max(0, st.st_size - _SAMPLE))
    h.update(f.read(_SAMPLE))
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, h.digest()


def check_model_file(path: str | os.PathLike) -> ModelInfo:
    """The :class:`ModelInfo` of the ONNX file at ``path``, after recomputing its digest (see the
    module docstring); :class:`ModelError` naming the file on any problem."""
    path = Path(path)
    source = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ModelError(f"{source}: no such model file; export one with 'spade-edge export'") from None
    except OSError as exc:
        raise ModelError(f"{source}: cannot read the model ({exc.strerror})") from exc
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{source}: not a model file")
        if st.st_size == 0:
            raise ModelError(f"{source}: not an ONNX model (the file is empty)")
        key = _key(f, st)
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            info = check_model_bytes(buf, source)
    with _cache_lock:
        _cache[key] = info
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return info


def _measure(paths) -> None:  # pragma: no cover - a measurement, run by hand (docs/gallery-format.md)
    import time

    for p in paths:
        size = os.path.getsize(p)
        with open(p, "rb") as f:  # out of the page cache: the first load after a boot or a copy
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t = []
        for _ in range(3):
            _cache.clear()
            t0 = time.perf_counter()
            check_model_file(p)
            t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        check_model_file(p)
        cached = time.perf_counter() - t0
        print(
            f"{p}: {size / 1e6:.1f} MB  cold {t[0] * 1e3:.1f} ms  (page cache warm) {min(t[1:]) * 1e3:.1f} ms  "
            f"cached {cached * 1e3:.3f} ms"
        )


if __name__ == "__main__":  # pragma: no cover
    import sys

    _measure(sys.argv[1:])
