"""Exact screens for the fused kernels (docs/speed.md, "The fused kernels and the screens"): a cheaper
lower bound of every expanded distance ranks the candidates, the kept ones are re-computed exactly,
and a row is *settled* only when the bound proves that nothing it dropped can belong; the rows that
are not are searched again by the fp32 kernel. So the neighbours are the fp32 path's, whatever the
data; the data decide only how much a screen saves.

Two screens, on the operands a_i = q_i - mu, b_j = g_j - mu (mu: the query's mean; distances do not
move, products and their rounding shrink):

- ``bf16`` (AVX512-BF16): a, b rounded once to bf16, products by VDPBF16PS, summed in fp32. With u
  the operands' unit roundoff (2^-8 + 2^-23, the fp32 step included) and k terms, the computed dot
  product is within f |a||b|, f = 2u + u^2 + k 2^-24 (1 + u)^2 (each product within (2u + u^2)
  |a_c||b_c|, the fp32 sum within k 2^-24 of the sum of magnitudes, Cauchy-Schwarz). The kernel ranks
  V = nb_j - 2 acc - e_i |b_j| with e_i = (2f + 2^-19)|a_i| and nb_j = |b_j|^2 (1 - 2^-20) - 2^-100
  (1 + max|a|): the margins cover the fp32 roundings of the norms and of the kernel's three
  operations (each under 2^-24 of |b|^2 + 3 |a||b|) and flushed subnormals.
- ``int8`` (AVX512-VNNI, for CPUs without BF16): per row x_q = rint(x / s), s = max|x| / 127 rounded
  up (nothing clips); VPDPBUSD sums u8 (b_q + 128) by s8 a_q exactly in int32. With each channel
  within s / 2, |a.b - s_a s_b a_q.b_q| <= (A1 s_b + B1 s_a) / 2 + k s_a s_b / 4 (A1 = s_a |a_q|_1,
  B1 = s_b |b_q|_1); the fp32 operations on terms no larger than M_k |a||b| are covered by e_i
  (:meth:`ScreenedSearch._int8_rows`).

Either way V <= |b_j|^2 - 2 a_i.b_j = d(i, j) - |a_i|^2. A screen of r principal components plus the
residual norm (a lower bound on any CPU) was measured and dropped: on ELPV through Lite0 it left
90-100 % of the rows unsettled at r = 4-32 (docs/speed.md).
"""

from __future__ import annotations

import numpy as np

from .amx_screen import bf16
from .base import keep, merge
from .fused import KERNEL, PACK, Clock, Fused

U_BF16 = 2.0**-8 + 2.0**-23  # bf16's unit roundoff, the step from float64 to fp32 included
PROBE, GIVE_UP = 4, 0.25  # after PROBE blocks, more than GIVE_UP of the rows unsettled: the screen is dropped


def factor(k: int, u: float) -> float:
    """f: the computed dot product of k terms, operands rounded with unit roundoff u, is within f |a||b|."""
    return 2 * u + u * u + k * 2.0**-24 * (1 + u) ** 2


class Operands:
    """The screen's operands: rows centred on the query's mean, in float64."""

    def __init__(self, q: np.ndarray):
        q64 = np.asarray(q, np.float64)
        self.mu = q64.mean(axis=0)
        self.a = q64 - self.mu


class ScreenedSearch:
    """One screened search of rows ``q`` with the fused kernel ``lib``: ``screen`` "bf16" or "int8"."""

    def __init__(self, lib, q: np.ndarray, kappa: int, screen: str, clock: Clock | None = None):
        self.lib, self.kappa, self.screen = lib, kappa, screen
        if screen not in ("bf16", "int8"):
            raise ValueError(f"unknown screen {screen!r}: bf16 or int8")
        self.bf16, self.int8 = screen == "bf16", screen == "int8"
        self.ops = Operands(q)
        a = self.ops.a
        k = a.shape[1]
        self.k = k
        f = factor(k + (k & 1), U_BF16)
        a_norm = np.sqrt(np.einsum("ij,ij->i", a, a))
        self.qsq = a_norm**2
        self.e = ((2 * f + 2.0**-19) * a_norm * (1 + 1e-6) + 2.0**-100).astype(np.float32)
        self.t = 2.0**-100 * (1 + a_norm.max(initial=0.0))
        self.run = Fused(lib, clock)
        self.run.start(np.ascontiguousarray(q, np.float32), keep(kappa))
        if self.int8:
            self._int8_rows(a, a_norm)
        elif self.bf16:
            bits = np.zeros((len(a), k + (k & 1)), np.uint16)
            bits[:, :k] = bf16(a.astype(np.float32))
            self.a_op = np.ascontiguousarray(bits).view(np.uint32)  # (P, pairs)
        else:
            self.a_op = np.ascontiguousarray(a, np.float32)

    def add(self, g: np.ndarray, base: int) -> None:
        """Screen gallery rows ``g`` (n, D) float32, indices base..; re-compute the entered ones exactly."""
        run, lib = self.run, self.lib
        g = np.ascontiguousarray(g, np.float32)
        n, w = len(g), run.width
        npan = -(-n // (2 * w)) * 2
        pnorms, pgn = np.empty(npan * w, np.float32), np.empty(npan * w, np.float32)
        if self.int8:  # one pass in C: centred, quantized, packed, normed
            d = self.a_op.shape[1]
            panels = np.empty(npan * d * w, np.uint32)
            psb, pb1 = np.empty(npan * w, np.float32), np.empty(npan * w, np.float32)
            run.panels_parallel(
                lambda p0, p1: lib.sf_prep_int8(
                    g.ctypes.data, n, g.shape[1], self.ops.mu.ctypes.data, d, p0, p1, self.t,
                    panels.ctypes.data, pnorms.ctypes.data, pgn.ctypes.data, psb.ctypes.data, pb1.ctypes.data,
                ),
                npan,
            )  # fmt: skip
            run.clock.lap(PACK)

            def part8(r0: int, r1: int) -> None:
                lib.sf_screen_int8(
                    r0, r1, self.a_op.ctypes.data, d, panels.ctypes.data, pnorms.ctypes.data, pgn.ctypes.data,
                    psb.ctypes.data, pb1.ctypes.data, self.rp.ctypes.data, self.corr.ctypes.data, npan, base,
                    run.m, run.vals.ctypes.data, run.idx.ctypes.data, run.exact.ctypes.data,
                )  # fmt: skip

            run.parallel(part8)
            run.clock.lap(KERNEL)
            run.recompute(g, base)
            return
        # bf16: one pass in C, centred, rounded, packed, normed
        d = self.a_op.shape[1]
        panels = np.empty(npan * d * w, np.uint32)
        run.panels_parallel(
            lambda p0, p1: lib.sf_prep_bf16(
                g.ctypes.data, n, g.shape[1], self.ops.mu.ctypes.data, d, p0, p1, self.t,
                panels.ctypes.data, pnorms.ctypes.data, pgn.ctypes.data,
            ),
            npan,
        )  # fmt: skip
        fn = lib.sf_screen_bf16

        def part(r0: int, r1: int) -> None:
            fn(
                r0, r1, self.a_op.ctypes.data, d, panels.ctypes.data, pnorms.ctypes.data, pgn.ctypes.data,
                self.e.ctypes.data, npan, base, run.m, run.vals.ctypes.data, run.idx.ctypes.data, run.exact.ctypes.data,
            )  # fmt: skip

        run.clock.lap(PACK)
        run.parallel(part)
        run.clock.lap(KERNEL)
        run.recompute(g, base)

    def _int8_rows(self, a: np.ndarray, a_norm: np.ndarray) -> None:
        """The query rows as the int8 screen's s8 quads and per-row parameters (kernels/fused.c
        sf_screen_int8; the bound in the module docstring)."""
        k = a.shape[1]
        if k > 1024:
            raise ValueError("the int8 screen's int32 sums are exact in fp32 up to 1024 channels")
        peak = np.abs(a).max(axis=1)
        s = (peak / 127).astype(np.float32)
        s = np.where(s.astype(np.float64) * 127 < peak, np.nextafter(s, np.float32(np.inf)), s)
        safe = np.where(s > 0, s, 1).astype(np.float64)
        a_q = np.clip(np.rint(a / safe[:, None]), -127, 127).astype(np.int8)
        quads = -(-k // 4)
        packed = np.zeros((len(a), 4 * quads), np.int8)
        packed[:, :k] = a_q
        self.a_op = np.ascontiguousarray(packed).view(np.uint32)
        self.corr = (128 * a_q.astype(np.int32).sum(axis=1)).astype(np.int32)
        a1 = s.astype(np.float64) * np.abs(a_q.astype(np.float64)).sum(axis=1)
        r = np.sqrt(k) / 254
        mk = 2 * (1 + r) ** 2 + 2 * (2 * r * (1 + r) + k / (2 * 127.0**2))  # the terms' size, in |a||b|
        self.rp = np.stack(
            [2 * s, (a1 + k * s / 2) * (1 + 2.0**-20), s, 2.0**-20 * mk * a_norm * (1 + 1e-6) + 2.0**-100], axis=1
        ).astype(np.float32)

    def unsettled(self) -> np.ndarray:
        """Rows whose dropped candidates may still belong: the kept list is full and its last lower
        bound does not exceed the kappa-th smallest exact distance kept (widened by its fp32 rounding)."""
        run = self.run
        dk = np.partition(run.exact, self.kappa - 1, axis=1)[:, self.kappa - 1].astype(np.float64)
        gamma = (self.run.q.shape[1] + 4) * 2.0**-23
        low = run.vals[:, -1].astype(np.float64) + self.qsq * (1 - 1e-9)
        return (run.idx[:, -1] >= 0) & ~(low > dk * (1 + 2 * gamma))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return merge(self.run.exact, self.run.idx, self.kappa)
