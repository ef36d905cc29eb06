"""``cupy.ndarray`` stand-in: a numpy array living in "device memory" of the fake machine.

Faithful:
- memory: every array's memory is a registered allocation of the device (context) that was
  current when it was made, 512-byte aligned; ``.data.ptr`` is its real address, so pointer-based
  calls (memcpyAsync, TensorRT tensor addresses, kernels) read and write it for real;
- ``.device``, ``.get()``; ``.astype``, ``.copy`` and every operation return new device arrays
  (0-d arrays, never numpy scalars, as CuPy);
- operations (ufuncs and operators, matmul, reductions, advanced indexing, astype, copy) on an
  array of another device than the calling thread's current one raise CuPy's ValueError "Array
  device must be same as the current device: array device = 1 while current = 0";
- mixing with numpy arrays raises CuPy's TypeError "Unsupported type <class 'numpy.ndarray'>";
  numpy functions called on these arrays go to the stand-in's function of the same name
  (``__array_function__``, as CuPy does), and fail with TypeError where the stand-in has none.

Not faithful: this is a numpy subclass, so ``np.asarray(x)`` / ``np.array(x)`` of a device array
silently give the host data, where CuPy raises TypeError (implicit conversion); use ``cupy.asnumpy``
in code under test and do not take a passing stand-in test as proof against that mistake. Views
(basic slicing, transpose, reshape) are free and unchecked, as in CuPy. Operations run eagerly
after the work queued on the current stream.
"""

from __future__ import annotations

import numpy as np

from ._machine import machine
from .cuda import stream as _stream
from .cuda.runtime import current_context


class MemoryPointer:
    """``a.data``: the address of the array's first element and the device it is on."""

    def __init__(self, array: ndarray):
        self.ptr = array.ctypes.data if array.size else 0
        self.device_id = array._context.device

    @property
    def device(self):
        from .cuda import Device

        return Device(self.device_id)

    def __int__(self) -> int:
        return self.ptr

    def __repr__(self) -> str:
        return f"<MemoryPointer 0x{self.ptr:x} on device {self.device_id}>"


class ndarray(np.ndarray):
    # wins binary operators against plain numpy arrays, so that mixing raises CuPy's TypeError
    __array_priority__ = 100.0
    _context = None

    def __array_finalize__(self, obj):
        ctx = getattr(obj, "_context", None)
        if self.flags.owndata and self.nbytes:
            # memory numpy allocated itself for a method the stand-in does not wrap (ndarray.dot,
            # a copying reshape, ...): device memory of the source's device all the same
            ctx = ctx or current_context()
            machine.register(self, self.ctypes.data, self.nbytes, ctx, "device")
        self._context = ctx

    # -------------------------------------------------------------- CuPy's own attributes

    @property
    def device(self):
        from .cuda import Device

        return Device(self._context.device)

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self)

    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        """The data as a numpy array (a copy), after the work queued on the current stream."""
        _stream.after_current_stream(self._context)
        host = np.array(self.view(np.ndarray), order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def __repr__(self) -> str:
        return repr(self.view(np.ndarray))

    def __str__(self) -> str:
        return str(self.view(np.ndarray))

    # -------------------------------------------------------------- operations

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        ctx = on_current_device([*inputs, *(out or ())], f"{ufunc.__name__}.{method}")
        machine.count("ops")
        args = [host_view(x) for x in inputs]
        kwargs = {k: host_view(v) for k, v in kwargs.items()}
        if out is not None:
            kwargs["out"] = tuple(host_view(o) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return wrap(result, ctx)

    def __array_function__(self, func, types, args, kwargs):
        from . import NUMPY_FUNCTIONS  # the stand-in's cupy.<name> for numpy.<name>

        impl = NUMPY_FUNCTIONS.get(func)
        return NotImplemented if impl is None else impl(*args, **kwargs)

    def __getitem__(self, key):
        base = self.view(np.ndarray)
        if _advanced(key):  # a gather kernel on the device: a new array
            ctx = on_current_device([self, *_arrays_in(key)], "indexing")
            machine.count("ops")
            return wrap(base[_host_key(key)], ctx)
        res = base[key]
        if not isinstance(res, np.ndarray):  # one element: CuPy gives a 0-d device array
            return wrap(res, on_current_device([self], "indexing"))
        view = res.view(ndarray)
        view._context = self._context
        return view

    def __setitem__(self, key, value):
        # numpy values are uploaded (CuPy allows them here); device arrays must be on this device
        on_current_device([self, *_arrays_in(key), *([value] if isinstance(value, ndarray) else [])], "setitem")
        if isinstance(value, ndarray):
            machine.count("ops")
        elif isinstance(value, np.ndarray):
            machine.count_h2d(value.nbytes)  # CuPy uploads the numpy value first
        else:
            machine.count("ops")  # a fill
        self.view(np.ndarray)[_host_key(key)] = host_view(value)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        ctx = on_current_device([self], "astype")
        machine.count("ops")
        return adopt(self.view(np.ndarray).astype(dtype, order=order, casting=casting or "unsafe"), ctx)

    def copy(self, order="C"):
        ctx = on_current_device([self], "copy")
        machine.count("ops")
        return adopt(self.view(np.ndarray).copy(order=order), ctx)


ndarray.__module__ = "cupy"  # as CuPy shows it: cupy.ndarray


# ------------------------------------------------------------------ helpers for cupy.* functions

_SCALARS = (bool, int, float, complex, np.generic)


def on_current_device(values, what: str):
    """The current context, after checking that every device array among ``values`` lives there
    and that no numpy array or other object is mixed in; runs what the current stream queued."""
    ctx = current_context()
    for v in values:
        if isinstance(v, ndarray):
            if v._context is not ctx:
                raise ValueError(
                    f"Array device must be same as the current device: array device = "
                    f"{v._context.device} while current = {ctx.device}\n[stand-in] in {what}"
                )
        elif not isinstance(v, _SCALARS) and v is not None:
            raise TypeError(f"Unsupported type {type(v)}")
    _stream.after_current_stream(ctx)
    return ctx


def host_view(x):
    """The numpy view of a device array's memory (anything else unchanged)."""
    return x.view(np.ndarray) if isinstance(x, ndarray) else x


def adopt(host: np.ndarray, ctx) -> ndarray:
    """A new device array of ``ctx`` holding a copy of ``host`` (C order, 512-byte aligned)."""
    host = np.asarray(host)
    buf = machine.allocate(host.nbytes, ctx)
    out = np.ndarray(host.shape, host.dtype, buffer=buf).view(ndarray)
    out._context = ctx
    np.copyto(out.view(np.ndarray), host)
    return out


def empty(shape, dtype, ctx, order="C") -> ndarray:
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    buf = machine.allocate(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, ctx)
    out = np.ndarray(shape, dtype, buffer=buf, order=order).view(ndarray)
    out._context = ctx
    return out


def wrap(result, ctx):
    """Results numpy computed: device arrays of ``ctx`` (scalars become 0-d arrays)."""
    if isinstance(result, tuple):
        return tuple(wrap(r, ctx) for r in result)
    if isinstance(result, (np.ndarray, np.generic)) and not isinstance(result, ndarray):
        return adopt(np.asarray(result), ctx)
    return result


def _items(key):
    return key if isinstance(key, tuple) else (key,)


def _advanced(key) -> bool:
    return any(isinstance(k, (np.ndarray, list, bool, np.bool_)) for k in _items(key))


def _arrays_in(key) -> list:
    return [k for k in _items(key) if isinstance(k, ndarray)]


def _host_key(key):
    return tuple(host_view(k) for k in key) if isinstance(key, tuple) else host_view(key)
