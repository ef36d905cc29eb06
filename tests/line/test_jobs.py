"""The line's own mapping of the service's outcomes to line codes, and its own metrics."""

from __future__ import annotations

import pytest

from spade_edge.line.jobs import LINE_CODES, Code, Line, LineError
from spade_edge.service.outcomes import (
    BadImage,
    Busy,
    DeadlinePassed,
    InferenceFailed,
    NotReady,
    TooLarge,
    Unsupported,
    WrongSize,
    lookup,
)


@pytest.mark.parametrize(
    "outcome, code",
    [
        (Busy(4, 4, 1), Code.BUSY),
        (NotReady("starting", None, 1), Code.REJECTED),
        (BadImage("x"), Code.BAD_IMAGE),
        (TooLarge("x"), Code.BAD_IMAGE),
        (Unsupported("x"), Code.BAD_IMAGE),
        (WrongSize("x"), Code.BAD_IMAGE),
        (DeadlinePassed("while queued"), Code.DEADLINE),
        (InferenceFailed(RuntimeError("x")), Code.ERROR),
    ],
)
def test_every_outcome_has_a_line_code(outcome, code):
    assert lookup(LINE_CODES, outcome) == code


def test_a_refused_trigger_carries_the_line_code(service, frames):
    from spade_edge.line.sources import FakeSource
    from spade_edge.service.inspector import InspectionService, ServiceConfig

    idle = InspectionService(ServiceConfig(), device="cpu", threads=1)  # never loaded: not ready
    try:
        with pytest.raises(LineError) as e:
            Line(idle, FakeSource(frames)).trigger()
        assert e.value.code == Code.REJECTED and "starting" in e.value.message
    finally:
        idle.close(drain_timeout=1)


def test_lines_register_their_metrics_once_and_count_together(service, frames):
    from spade_edge.line.sources import FakeSource

    from ..service.conftest import parse_metrics

    a, b = Line(service, FakeSource(frames[:1])), Line(service, FakeSource(frames[:1]))
    assert a.inspect().code == Code.OK and b.inspect().code == Code.OK
    vals = parse_metrics(service.registry.render())
    assert vals['spade_edge_line_jobs_total{outcome="ok"}'] == 2
    assert vals['spade_edge_line_jobs_total{outcome="bad_image"}'] == 0
    assert "spade_edge_inspect_requests_total" not in service.registry.render()  # HTTP's, added by its server
