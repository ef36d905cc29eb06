"""What an inspection can end in, other than a result: the core's vocabulary.

:class:`~.inspector.InspectionService` raises these (``admit``, ``run``, ``probe_image``); it
knows no protocol. Each adapter maps them to its own codes in its own module, with the first
class of an outcome's MRO found in its table (so ``TooLarge`` may get its own code and fall back
to ``BadImage``'s):

- HTTP: ``service/server.py`` (``HTTP_STATUS``: status, metrics label, ``Retry-After``);
- the line (text protocol, Modbus, OPC UA, MQTT share its numeric codes): ``line/jobs.py``
  (``LINE_CODES``), and each line adapter maps those codes to its own registers or status codes.
"""

from __future__ import annotations


class Outcome(Exception):
    """An inspection that gave no result, with a sentence for the operator (``message``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Busy(Outcome):
    """Every slot is taken (``queue_depth`` of ``capacity``): try again in ``retry_after`` seconds."""

    def __init__(self, queue_depth: int, capacity: int, retry_after: int):
        super().__init__(f"queue full ({queue_depth} of {capacity} requests in service); retry shortly")
        self.queue_depth, self.capacity, self.retry_after = queue_depth, capacity, retry_after


class NotReady(Outcome):
    """The service cannot take images now: ``state`` is starting, stopping or failed (``reason``)."""

    def __init__(self, state: str, reason: str | None, retry_after: int):
        super().__init__(f"service is {state}" + (f": {reason}" if reason else ""))
        self.state, self.reason, self.retry_after = state, reason, retry_after


class BadImage(Outcome):
    """The image cannot be inspected: empty, not decodable, truncated, alpha channel."""


class TooLarge(BadImage):
    """The image (by its header) has more pixels than the service accepts."""


class Unsupported(BadImage):
    """Not an image in a format the service reads."""


class WrongSize(BadImage):
    """An image, but of a size this station does not inspect (too small, not the expected size)."""


class DeadlinePassed(Outcome):
    """The deadline passed ``where`` (decoding, queued, running): no result, and none is coming."""

    def __init__(self, where: str):
        super().__init__(f"deadline passed {where}")
        self.where = where


class InferenceFailed(Outcome):
    """The model or the scorer raised ``error`` on this image (the service goes on)."""

    def __init__(self, error: BaseException):
        super().__init__(f"inference failed: {type(error).__name__}: {error}")
        self.error = error


def lookup(table: dict, outcome: Outcome, default=None):
    """``table``'s entry for the outcome's class or its nearest base class that has one."""
    for cls in type(outcome).__mro__:
        if cls in table:
            return table[cls]
    return default
