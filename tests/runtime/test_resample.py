import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from spade_edge.runtime.resample import gaussian_blur, interp_matrix, upsample_hwc, upsample_map


@pytest.mark.parametrize(
    "src,dst", [((14, 14), (224, 224)), ((7, 9), (56, 30)), ((5, 5), (5, 5)), ((28, 28), (56, 56))]
)
def test_bilinear_matches_torch(src, dst):
    x = np.random.default_rng(0).normal(size=(4, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=dst, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(upsample_hwc(x.transpose(1, 2, 0), *dst).transpose(2, 0, 1), ref, atol=1e-5)
    np.testing.assert_allclose(upsample_map(x[0], *dst), ref[0], atol=1e-5)


def test_interpolation_rows_are_convex_weights():
    m = interp_matrix(56, 14)
    np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)
    assert (m >= 0).all()


@pytest.mark.parametrize("shape", [(224, 224), (10, 12), (40, 3)])
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_matches_scipy(shape, sigma):
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    np.testing.assert_allclose(gaussian_blur(x, sigma), gaussian_filter(x, sigma), atol=1e-5)
