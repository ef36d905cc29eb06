"""The NEON level of kernels/fused.c on an x86 host: cross-compiled (Debian's gcc-aarch64-linux-gnu)
with a small driver into a static binary and run under qemu-aarch64 (qemu-user), on the flags
fused.LEVELS gives the neon level. Its candidates, re-computed exactly and merged as FusedScorer does,
are the float64 search's neighbours, ties to the lower index."""

import platform
import shutil
import subprocess

import numpy as np
import pytest

from spade_edge.runtime.scoring import ccompile, fused
from spade_edge.runtime.scoring.base import merge

CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
pytestmark = pytest.mark.skipif(
    platform.machine() in ("aarch64", "arm64") or not (shutil.which(CC) and shutil.which(QEMU)),
    reason="needs an x86 host with gcc-aarch64-linux-gnu and qemu-user (.ci/run installs them); on Arm "
    "test_fused.py runs the neon level natively",
)

# reads p, n, d, m, then q (p x d), g (n x d), norms (n) as float32; writes idx (p x m) int64
DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int32_t sf_width(void);
void sf_pack(const float *, int64_t, int64_t, int64_t, const float *, int64_t, float *, float *);
void sf_search(int64_t, int64_t, const float *, int64_t, const float *, const float *, int64_t, int64_t, int32_t,
               float *, int64_t *, float *);
int main(int argc, char **argv) {
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    int64_t h[4];
    if (fread(h, 8, 4, in) != 4) return 1;
    int64_t p = h[0], n = h[1], d = h[2], m = h[3], w = sf_width(), npan = (n + 2 * w - 1) / (2 * w) * 2;
    float *q = malloc(4 * p * d), *g = malloc(4 * n * d), *nr = malloc(4 * n);
    if (fread(q, 4, p * d, in) != (size_t)(p * d) || fread(g, 4, n * d, in) != (size_t)(n * d) ||
        fread(nr, 4, n, in) != (size_t)n) return 1;
    float *pan = malloc(4 * npan * d * w), *pn = malloc(4 * npan * w), *v = malloc(4 * p * m), *ex = malloc(4 * p * m);
    int64_t *ix = malloc(8 * p * m);
    for (int64_t i = 0; i < p * m; i++) v[i] = 1.0f / 0.0f, ix[i] = -1;
    int64_t half = n / 2; /* two blocks, as a gallery of two images */
    sf_pack(g, half, d, d, nr, npan, pan, pn);
    sf_search(0, p, q, d, pan, pn, (half + 2 * w - 1) / (2 * w) * 2, 0, (int32_t)m, v, ix, ex);
    sf_pack(g + half * d, n - half, d, d, nr + half, npan, pan, pn);
    sf_search(0, p, q, d, pan, pn, (n - half + 2 * w - 1) / (2 * w) * 2, half, (int32_t)m, v, ix, ex);
    fwrite(ix, 8, p * m, out);
    return 0;
}
"""


@pytest.mark.parametrize("kappa, dim", [(1, 24), (5, 40), (3, 7)])
def test_neon_kernel_finds_the_float64_neighbours(tmp_path, kappa, dim):
    (tmp_path / "driver.c").write_text(DRIVER)
    exe = tmp_path / "fused-neon"
    flags = ["-O3", "-static", *fused.LEVELS["neon"][1]]
    subprocess.run(
        [CC, *flags, "-o", str(exe), str(tmp_path / "driver.c"), str(ccompile.KERNELS / "fused.c"), "-lm"],
        check=True,
        capture_output=True,
    )
    rng = np.random.default_rng(dim)
    p, n, m = 37, 203, fused.keep(kappa)
    q = rng.normal(size=(p, dim)).astype(np.float32)
    g = np.concatenate([rng.normal(size=(n - 20, dim)), rng.normal(size=(20, dim))[[*range(10), *range(10)]]])
    g = g.astype(np.float32)  # the last 20 rows: ten duplicated pairs, ties to the lower index
    norms = np.einsum("ij,ij->i", g, g)
    data = np.array([p, n, dim, m], np.int64).tobytes() + q.tobytes() + g.tobytes() + norms.tobytes()
    (tmp_path / "in.bin").write_bytes(data)
    subprocess.run([QEMU, str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=120)
    idx = np.fromfile(tmp_path / "out.bin", np.int64).reshape(p, m)
    assert (idx >= 0).all() and all(len(set(r)) == m for r in idx)
    exact = ((q[:, None, :] - g[idx]) ** 2).sum(-1)
    got_d, got_i = merge(exact, idx, kappa)
    d64 = ((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)
    want = np.argsort(d64, axis=1, kind="stable")[:, :kappa]
    np.testing.assert_array_equal(got_i, want)
    np.testing.assert_allclose(got_d, np.take_along_axis(d64, want, 1), rtol=1e-5)
