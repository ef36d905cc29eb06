"""A reload that keeps the model file keeps its backend: the grown (or rolled back) gallery joins the
running session instead of loading the model again (InspectionService.reload, Detector.with_gallery)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spade_edge.service.inspector import InspectionService, ServiceConfig


def _neighbours(service: InspectionService, image) -> list[str]:
    cur = service.current.use()
    try:
        return list(cur.detector.predict(image).neighbors)
    finally:
        cur.done()


def test_same_model_reload_keeps_the_backend_and_uses_the_new_gallery(assets):
    svc = InspectionService(ServiceConfig(warmup=1))
    try:
        svc.load(assets["model"], assets["gallery_a"])
        first = svc.current
        backend = first.detector.backend
        image = str(assets["images"]["normal0.png"])
        assert all(n.startswith("a_") for n in _neighbours(svc, image))

        info = svc.reload(gallery=str(assets["gallery_b"]))
        second = svc.current
        assert info["generation"] == 2 and info["warmup_ms"] == 0.0  # no model load, no warm-up
        assert second.detector.backend is backend
        # the retired generation closed its detector, but not the backend the new one shares
        assert all(n.startswith("b_") for n in _neighbours(svc, image))

        # the model file changed on disk: loaded again, a backend of its own
        st = os.stat(assets["model"])
        os.utime(assets["model"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        try:
            info = svc.reload()
        finally:
            os.utime(assets["model"], ns=(st.st_atime_ns, st.st_mtime_ns))
        assert info["generation"] == 3 and svc.current.detector.backend is not backend
        assert all(n.startswith("b_") for n in _neighbours(svc, image))
    finally:
        svc.close()


def test_shared_backend_is_closed_by_the_last_detector(assets):
    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.gallery import Gallery

    with pytest.warns(UserWarning, match="thresholds"):  # k_image differs from the gallery's: it says so
        det = Detector.load(assets["model"], assets["gallery_a"], device="cpu", k_image=3)
    closed = []
    real_close = det.backend.close
    det.backend.close = lambda: (closed.append(1), real_close())
    with pytest.warns(UserWarning, match="thresholds"):
        other = det.with_gallery(Gallery.load(assets["gallery_b"]))
    assert other.config.k_image == 3  # load()'s overrides hold for the new gallery
    image = np.full((40, 48, 3), 120, np.uint8)
    det.close()
    assert closed == []  # the other still uses it
    assert other.predict(image).verdict in ("OK", "NOT_OK")
    other.close()
    assert closed == [1]
