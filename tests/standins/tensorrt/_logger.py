"""``ILogger`` and ``Logger``, and how the stand-in reports through them.

Faithful: a subclass must call ``trt.ILogger.__init__(self)`` (else TypeError at construction, as
pybind11 says it); ``ILogger.log`` is pure virtual; ``Builder``/``Runtime`` take only ILoggers; an
exception raised by ``log`` is printed and swallowed, as TensorRT does. Severity is an enum whose
``int()`` gives TensorRT's order (INTERNAL_ERROR=0 ... VERBOSE=4).
"""

from __future__ import annotations

import sys

from ._enums import Severity


class _ChecksInit(type):
    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        if not obj.__dict__.get("_standin_ilogger_init"):
            raise TypeError("tensorrt.ILogger.__init__() must be called when overriding __init__")
        return obj


class ILogger(metaclass=_ChecksInit):
    Severity = Severity
    INTERNAL_ERROR, ERROR, WARNING = Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING
    INFO, VERBOSE = Severity.INFO, Severity.VERBOSE

    def __init__(self):
        self.__dict__["_standin_ilogger_init"] = True

    def log(self, severity, msg):
        raise RuntimeError('Tried to call pure virtual function "ILogger::log"')


class Logger(ILogger):
    """TensorRT's own logger: messages at ``min_severity`` or more severe go to stderr."""

    def __init__(self, min_severity=Severity.WARNING):
        ILogger.__init__(self)
        self.min_severity = min_severity

    def log(self, severity, msg):
        if int(severity) <= int(self.min_severity):
            print(f"[TRT] [{'FEWIV'[int(severity)]}] {msg}", file=sys.stderr)


def check_logger(logger, where: str) -> None:
    if not isinstance(logger, ILogger):
        raise TypeError(
            f"{where}(): incompatible constructor arguments. The following argument types are "
            f"supported:\n    1. {where}(logger: tensorrt.ILogger)\n\nInvoked with: {logger!r}"
        )


def report(logger, severity, msg: str) -> None:
    """Send ``msg`` to the user's logger; its exceptions are printed, never raised."""
    try:
        logger.log(severity, msg)
    except Exception as exc:  # noqa: BLE001 (TensorRT swallows them too)
        print(f"[ERROR] Exception caught in log(): {exc}", file=sys.stderr)


def error(logger, msg: str) -> None:
    report(logger, Severity.ERROR, msg)


def warning(logger, msg: str) -> None:
    report(logger, Severity.WARNING, msg)
