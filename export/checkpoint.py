"""Tensors of a PyTorch checkpoint (.pth) read without unpickling.

Upstream weights (torchvision's WRN50x2, the EfficientNet-Lite0 package) come in torch's format,
whose structure is a pickle. Here its opcodes are read by a small interpreter that knows only
what a state dict needs: dicts, lists, tuples, numbers, strings, and the few torch globals that
rebuild a tensor from a storage. Any other global is refused, so nothing in the file can run.
The opcodes are decoded here too (:data:`OPCODES`), byte by byte: Python's pickle machinery is
never involved, and an opcode a state dict does not use is refused before its argument is read.
Both layouts are read: the zip archive (torch >= 1.6) and the legacy stream of pickles.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(ValueError):
    """The checkpoint asks for something a state dict does not need (refused, not run)."""


class _Storage:
    def __init__(self, kind: str, key: str, numel: int):
        if kind not in DTYPES:
            raise UnsafeCheckpointError(f"unknown storage type {kind}")
        self.kind, self.key, self.numel = kind, str(key), int(numel)
        self.data: bytes | None = None  # read after the pickle that names it


class _TensorRef:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        if self.storage.data is None:
            raise ValueError(f"storage {self.storage.key}: its data is missing from the checkpoint")
        flat = np.frombuffer(self.storage.data, DTYPES[self.storage.kind], count=self.storage.numel)
        if self.storage.kind == "BFloat16Storage":  # numpy has no bfloat16: widen to float32
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset :], self.size, [s * item for s in self.stride])
        return np.array(view)  # a copy: the tensor owns its memory


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in DTYPES},
}


def _line(f) -> bytes:
    line = f.readline()
    if not line.endswith(b"\n"):
        raise UnsafeCheckpointError("truncated checkpoint")
    return line[:-1]


def _exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise UnsafeCheckpointError("truncated checkpoint")
    return data


def _unsigned(size: int):
    return lambda f: int.from_bytes(_exactly(f, size), "little")


def _sized(size: int, decode):
    return lambda f: decode(_exactly(f, _unsigned(size)(f)))


def _decimal(f) -> int | bool:
    text = _line(f)
    if text in (b"00", b"01"):  # protocol 0 writes booleans as INT 00 and 01
        return text == b"01"
    return int(text.rstrip(b"L"))


def _utf8(b: bytes) -> str:
    return b.decode("utf-8", "surrogatepass")


def _signed(b: bytes) -> int:
    return int.from_bytes(b, "little", signed=True)


# opcode byte -> (name, argument reader); the names are those of the pickle protocol (PEP 307, 3154)
OPCODES = {
    0x80: ("PROTO", _unsigned(1)),
    0x95: ("FRAME", _unsigned(8)),
    b".": ("STOP", None),
    b"X": ("BINUNICODE", _sized(4, _utf8)),
    0x8C: ("SHORT_BINUNICODE", _sized(1, _utf8)),
    0x8D: ("BINUNICODE8", _sized(8, _utf8)),
    b"V": ("UNICODE", lambda f: _line(f).decode("raw-unicode-escape")),
    b"J": ("BININT", lambda f: _signed(_exactly(f, 4))),
    b"K": ("BININT1", _unsigned(1)),
    b"M": ("BININT2", _unsigned(2)),
    0x8A: ("LONG1", _sized(1, _signed)),
    0x8B: ("LONG4", _sized(4, _signed)),
    b"G": ("BINFLOAT", lambda f: struct.unpack(">d", _exactly(f, 8))[0]),
    b"C": ("SHORT_BINBYTES", _sized(1, bytes)),
    b"B": ("BINBYTES", _sized(4, bytes)),
    b"I": ("INT", _decimal),
    b"L": ("LONG", _decimal),
    b"N": ("NONE", None),
    0x88: ("NEWTRUE", None),
    0x89: ("NEWFALSE", None),
    b"(": ("MARK", None),
    b"}": ("EMPTY_DICT", None),
    b"]": ("EMPTY_LIST", None),
    b")": ("EMPTY_TUPLE", None),
    b"t": ("TUPLE", None),
    0x85: ("TUPLE1", None),
    0x86: ("TUPLE2", None),
    0x87: ("TUPLE3", None),
    b"d": ("DICT", None),
    b"l": ("LIST", None),
    b"q": ("BINPUT", _unsigned(1)),
    b"r": ("LONG_BINPUT", _unsigned(4)),
    b"p": ("PUT", _decimal),
    0x94: ("MEMOIZE", None),
    b"h": ("BINGET", _unsigned(1)),
    b"j": ("LONG_BINGET", _unsigned(4)),
    b"g": ("GET", _decimal),
    b"c": ("GLOBAL", lambda f: f"{_line(f).decode('ascii')} {_line(f).decode('ascii')}"),
    0x93: ("STACK_GLOBAL", None),
    b"R": ("REDUCE", None),
    b"b": ("BUILD", None),
    b"s": ("SETITEM", None),
    b"u": ("SETITEMS", None),
    b"a": ("APPEND", None),
    b"e": ("APPENDS", None),
    b"Q": ("BINPERSID", None),
}
OPCODES = {(k[0] if isinstance(k, bytes) else k): v for k, v in OPCODES.items()}  # printable ones written as bytes


def _opcodes(f):
    """(name, argument) of each opcode of one pickle, read from ``f`` up to and including STOP."""
    while True:
        code = f.read(1)
        if not code:
            raise UnsafeCheckpointError("truncated checkpoint")
        if code[0] not in OPCODES:
            raise UnsafeCheckpointError(f"unsupported pickle opcode 0x{code[0]:02x}")
        name, read = OPCODES[code[0]]
        yield name, None if read is None else read(f)
        if name == "STOP":
            return


def _interpret(f, persistent_load=None):
    """Run one pickle's opcodes with the whitelist above; returns the object it builds."""
    stack, marks, memo = [], [], {}

    def pop_mark():
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for name, arg in _opcodes(f):
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name in (
            "BINUNICODE",
            "SHORT_BINUNICODE",
            "BINUNICODE8",
            "UNICODE",
            "BININT",
            "BININT1",
            "BININT2",
            "LONG1",
            "LONG4",
            "BINFLOAT",
            "SHORT_BINBYTES",
            "BINBYTES",
            "INT",
            "LONG",
        ):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
            stack.append({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple}[name]())
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name in ("DICT", "LIST"):
            items = pop_mark()
            stack.append(dict(zip(items[::2], items[1::2])) if name == "DICT" else items)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, attr = arg.split(" ", 1)
            else:
                attr, module = stack.pop(), stack.pop()
            if (module, attr) not in GLOBALS:
                raise UnsafeCheckpointError(f"checkpoint refers to {module}.{attr}, which a state dict never needs")
            stack.append(GLOBALS[(module, attr)])
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not callable(fn):
                raise UnsafeCheckpointError(f"cannot call {fn!r}")
            stack.append(fn(*args))
        elif name == "BUILD":
            stack.pop()  # object state (a state dict's _metadata): not needed for the tensors
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].update(zip(items[::2], items[1::2]))
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "BINPERSID" and persistent_load is not None:
            stack.append(persistent_load(stack.pop()))
        else:
            raise UnsafeCheckpointError(f"unsupported pickle opcode {name}")


def _storage_from_id(pid, storages: dict) -> _Storage:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
    if len(pid) > 5 and pid[5] is not None:
        raise UnsafeCheckpointError("legacy storage views are not supported; re-save the state dict with torch.save")
    kind, key, numel = pid[1], pid[2], pid[4]
    if key not in storages:
        storages[key] = _Storage(kind, key, numel)
    return storages[key]


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        import torch

        return torch.from_numpy(obj.array())
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def read_checkpoint(path: str | os.PathLike):
    """The object a .pth file holds (a state dict), with tensors rebuilt from raw storage."""
    path = Path(path)
    storages: dict[str, _Storage] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise UnsafeCheckpointError(f"{path}: a zip without data.pkl is not a torch checkpoint")
            root = pkl[: -len("data.pkl")]
            obj = _interpret(io.BytesIO(z.read(pkl)), lambda pid: _storage_from_id(pid, storages))
            for s in storages.values():
                s.data = z.read(f"{root}data/{s.key}")
        return _materialise(obj)
    with open(path, "rb") as f:
        if _interpret(f) != LEGACY_MAGIC:
            raise UnsafeCheckpointError(f"{path} is not a torch checkpoint")
        _interpret(f)  # protocol version
        _interpret(f)  # system info
        obj = _interpret(f, lambda pid: _storage_from_id(pid, storages))
        for key in _interpret(f):  # the storages follow, in this order: int64 element count, then bytes
            s = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            s.data = f.read(numel * np.dtype(DTYPES[s.kind]).itemsize)
    return _materialise(obj)
