import math

import pytest

from spade_edge.service import metrics as m

from .conftest import parse_metrics


def test_counter_gauge_histogram_render_in_the_text_format():
    r = m.Registry()
    c = r.add(m.Counter("x_requests_total", "Requests.", ("outcome",), preset=[{"outcome": "ok"}]))
    g = r.add(m.Gauge("x_depth", "Depth."))
    r.add(m.Gauge("x_fn", "From a function.", fn=lambda: 2.5))
    h = r.add(m.Histogram("x_seconds", "Latency.", buckets=(0.1, 1.0)))
    c.inc(outcome="ok")
    c.inc(3, outcome='we"ird\nlabel')
    g.set(4)
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v)
    text = r.render()
    assert "# TYPE x_requests_total counter" in text and "# TYPE x_seconds histogram" in text
    vals = parse_metrics(text)
    assert vals['x_requests_total{outcome="ok"}'] == 1
    assert vals['x_requests_total{outcome="we\\"ird\\nlabel"}'] == 3
    assert vals["x_depth"] == 4 and vals["x_fn"] == 2.5
    # cumulative buckets: le=0.1 holds 0.05 and 0.1 (upper bound inclusive)
    assert vals['x_seconds_bucket{le="0.1"}'] == 2
    assert vals['x_seconds_bucket{le="1"}'] == 3
    assert vals['x_seconds_bucket{le="+Inf"}'] == 4 == vals["x_seconds_count"]
    assert math.isclose(vals["x_seconds_sum"], 7.65)
    assert text.endswith("\n")


def test_labels_are_checked_and_names_unique():
    r = m.Registry()
    c = r.add(m.Counter("y_total", "Y.", ("outcome",)))
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(code="200")
    with pytest.raises(ValueError, match="twice"):
        r.add(m.Gauge("y_total", "again"))
    with pytest.raises(ValueError, match="twice"):  # shared, but not the same kind of metric
        r.add(m.Gauge("y_total", "again"), shared=True)
    assert r.add(m.Counter("y_total", "Y.", ("outcome",)), shared=True) is c  # two adapters of one kind


def test_resident_memory_reads_proc():
    assert m.resident_memory_bytes() > 1e6
