"""Fixtures of the line adapters: the service's tiny model and galleries, loaded in-process, and a
Line whose fake camera cycles through normal images and one bright (defective) image."""

from __future__ import annotations

import numpy as np
import pytest

from ..service.conftest import assets  # noqa: F401 - the same tiny model and galleries


@pytest.fixture
def service(assets):  # noqa: F811
    from spade_edge.service.inspector import InspectionService, ServiceConfig

    svc = InspectionService(ServiceConfig(queue_size=4, warmup=1), device="cpu", threads=1)
    svc.load(assets["model"], assets["gallery_a"])
    yield svc
    svc.close(drain_timeout=10)


@pytest.fixture
def frames(assets):  # noqa: F811
    """Four normal images then a bright one: every fifth job is NOT_OK."""
    from PIL import Image

    imgs = [np.asarray(Image.open(assets["images"][f"normal{i}.png"]).convert("RGB")) for i in range(4)]
    return imgs + [np.asarray(Image.open(assets["images"]["bright.png"]).convert("RGB"))]


@pytest.fixture
def line(service, frames):
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource

    return Line(service, FakeSource(frames), deadline=20.0)
