/* A bf16 screen of squared distances on Intel AMX, for runtime/scoring/amx.py (docs/speed.md).

   Per slab of gallery cells, every query row i gets approx(i, j) = norm[j] + sum over segments of
   A_seg[i, :] . B_seg[:, j], the products in bf16 and the sums in fp32 (AMX tiles), and the m
   smallest approx values of each row are kept in a running list. The caller bounds the bf16 error
   and re-computes the survivors exactly: this file only has to be fast, not exact.

   Layouts (bf16, K_pad a multiple of 32; columns past a segment's own width meet zero rows of B):
   - A row-major with a leading dimension lda (elements), read K_pad columns from its first; or, with
     lda = 0, "tiled": each 16 x 32 tile contiguous, tile (r / 16, k / 32) at ((r / 16) * K_pad / 32 + k / 32) * 512;
   - B "VNNI" tiled: the 16 x 32 tile of k pairs (k / 32, n / 16) contiguous at ((k / 32) * n_pad / 16 + n / 16) * 512,
     element (k, n) inside it at (k % 32 / 2) * 32 + (n % 16) * 2 + k % 2.
   Contiguous tiles keep the loads from L2 in whole lines (strided tiles ran 5x slower). Query rows
   come in blocks of 32 and gallery columns in blocks of 32: two by two tiles of 16 x 16 sums. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    const uint16_t *a; /* first row, first column of this segment's window */
    int64_t lda;       /* elements; 0: tiled */
    const uint16_t *b; /* VNNI packed, k_pad x n_pad */
    int64_t k_pad;
} segment;

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out AMX state only on request, once per process. */
int se_enable(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

static inline uint16_t to_bf16(float x) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline int64_t b_at(int64_t k, int64_t n, int64_t n_pad) {
    return ((k / 32) * (n_pad / 16) + n / 16) * 512 + (k % 32 / 2) * 32 + (n % 16) * 2 + (k & 1);
}

/* dst (k_pad x n_pad, B layout) = bf16(scale * (src[n * sn + k * sk] - mu[k])) for n < n_valid, k < k_valid,
   zero elsewhere; colnorm[n] (if given) = |src[n] - mu|, for the caller's error bound. */
void se_pack_b(const float *src, int64_t sn, int64_t sk, int32_t n_valid, int32_t k_valid, const float *mu,
               float scale, int32_t n_pad, int32_t k_pad, uint16_t *dst, float *colnorm) {
    memset(dst, 0, sizeof(uint16_t) * (size_t)n_pad * (size_t)k_pad);
    for (int32_t n = 0; n < n_valid; n++) {
        double norm = 0.0;
        const float *s = src + n * sn;
        for (int32_t k = 0; k < k_valid; k++) {
            float v = s[k * sk] - (mu ? mu[k] : 0.0f);
            norm += (double)v * v;
            dst[b_at(k, n, n_pad)] = to_bf16(scale * v);
        }
        if (colnorm) colnorm[n] = (float)sqrt(norm) * (1.0f + 1e-6f); /* rounded up */
    }
}

/* Rows [r0, r1) of a bilinearly upsampled matrix, row r = sum_t w[r, t] src[at[r, t], :] (four taps, weights
   may be zero), cut into the windows the slabs read: slab s gets columns [starts[s], starts[s] + k_pad) (zero
   past cols) in A's tiled layout at dst + s * rows * 2 k_pad, twice: k_pad columns of bf16(row) ("hi"),
   then k_pad of bf16(row - hi) ("lo"), so that hi + lo carries 16 bits. rowmax[r] = max |row|. */
void se_upsample_tiles(const float *src, int64_t lds, int64_t cols, const int64_t *at, const float *w, int64_t r0,
                       int64_t r1, int32_t n_slab, const int64_t *starts, int64_t k_pad, int64_t rows, uint16_t *dst,
                       float *rowmax) {
    int64_t width = (cols + k_pad + 15) / 16 * 16, steps = k_pad / 32;
    uint16_t *row_bf = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * 2 * width), *row_lo = row_bf + width;
    for (int64_t r = r0; r < r1; r++) {
        const float *s0 = src + at[4 * r] * lds, *s1 = src + at[4 * r + 1] * lds;
        const float *s2 = src + at[4 * r + 2] * lds, *s3 = src + at[4 * r + 3] * lds;
        __m512 w0 = _mm512_set1_ps(w[4 * r]), w1 = _mm512_set1_ps(w[4 * r + 1]);
        __m512 w2 = _mm512_set1_ps(w[4 * r + 2]), w3 = _mm512_set1_ps(w[4 * r + 3]), big = _mm512_setzero_ps();
        for (int64_t c = 0; c < width; c += 16) {
            __mmask16 in = c + 16 <= cols ? 0xffff : c < cols ? (__mmask16)((1u << (cols - c)) - 1) : 0;
            __m512 v = _mm512_mul_ps(w0, _mm512_maskz_loadu_ps(in, s0 + c));
            v = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(in, s1 + c), v);
            v = _mm512_fmadd_ps(w2, _mm512_maskz_loadu_ps(in, s2 + c), v);
            v = _mm512_fmadd_ps(w3, _mm512_maskz_loadu_ps(in, s3 + c), v);
            big = _mm512_max_ps(big, _mm512_abs_ps(v));
            __m256bh h = _mm512_cvtneps_pbh(v); /* round to nearest even */
            __m256i bits;
            memcpy(&bits, &h, 32);
            __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
            __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
            memcpy(row_bf + c, &h, 32);
            memcpy(row_lo + c, &l, 32);
        }
        rowmax[r] = _mm512_reduce_max_ps(big);
        for (int32_t sl = 0; sl < n_slab; sl++) {
            uint16_t *tile = dst + sl * rows * 2 * k_pad + (r / 16) * 2 * steps * 512 + (r % 16) * 32;
            for (int64_t k = 0; k < steps; k++) {
                memcpy(tile + k * 512, row_bf + starts[sl] + 32 * k, 64);
                memcpy(tile + (steps + k) * 512, row_lo + starts[sl] + 32 * k, 64);
            }
        }
    }
    free(row_bf);
}

static inline void insert(float v, int64_t index, float *vals, int64_t *idx, int32_t m, float *thr) {
    int32_t worst = 0;
    for (int32_t t = 1; t < m; t++)
        if (vals[t] > vals[worst]) worst = t;
    vals[worst] = v;
    idx[worst] = index;
    float top = vals[0];
    for (int32_t t = 1; t < m; t++) top = fmaxf(top, vals[t]);
    *thr = top;
}

/* Rows [r0, r1) (multiples of 32) against n_slab slabs of n_pad columns each (a multiple of 32).
   Slab s has n_seg segments segs[s * n_seg ...], norms[s * n_pad ...] (+inf past its cells) and
   colnorm[s * n_pad ...]; its column c is gallery index base + s * cells_per_slab + c. Ranked value:
   products + norm[c] - rowscale[r] * colnorm[c] (a lower bound, the caller's error term removed).
   vals/idx: m per row, thr: the largest of them (+inf until full); a candidate enters when strictly below thr. */
void se_screen(int64_t r0, int64_t r1, int32_t n_slab, int32_t n_seg, const segment *segs, int32_t n_pad,
               const float *norms, const float *colnorm, const float *rowscale, int64_t base, int64_t cells_per_slab,
               int32_t m, float *vals, int64_t *idx, float *thr) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    float c[32 * 32] __attribute__((aligned(64)));
    for (int32_t s = 0; s < n_slab; s++) { /* a slab's B stays in L2 while every row block passes */
        const segment *sg = segs + (int64_t)s * n_seg;
        const float *nrm = norms + (int64_t)s * n_pad, *cn = colnorm + (int64_t)s * n_pad;
        int64_t first = base + s * cells_per_slab;
        for (int64_t r = r0; r < r1; r += 32) {
            for (int32_t n0 = 0; n0 < n_pad; n0 += 32) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int32_t g = 0; g < n_seg; g++) {
                    int64_t steps = sg[g].k_pad / 32, lda = sg[g].lda;
                    /* A: both tiles of step k at a0 + k * a_step and a0 + a_next + k * a_step */
                    const uint16_t *a0 = lda ? sg[g].a + r * lda : sg[g].a + (r / 16) * steps * 512;
                    int64_t a_step = lda ? 32 : 512, a_next = lda ? 16 * lda : steps * 512, a_stride = lda ? 2 * lda : 64;
                    const uint16_t *b = sg[g].b + (n0 / 16) * 512;
                    for (int64_t k = 0; k < steps; k++, b += (n_pad / 16) * 512) {
                        _tile_loadd(4, a0 + k * a_step, a_stride);
                        _tile_loadd(5, a0 + a_next + k * a_step, a_stride);
                        _tile_loadd(6, b, 64);
                        _tile_loadd(7, b + 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, c, 128);
                _tile_stored(1, c + 16, 128);
                _tile_stored(2, c + 16 * 32, 128);
                _tile_stored(3, c + 16 * 32 + 16, 128);
                __m512 n_lo = _mm512_loadu_ps(nrm + n0), n_hi = _mm512_loadu_ps(nrm + n0 + 16);
                __m512 c_lo = _mm512_loadu_ps(cn + n0), c_hi = _mm512_loadu_ps(cn + n0 + 16);
                for (int i = 0; i < 32; i++) {
                    int64_t row = r + i;
                    float t = thr[row];
                    __m512 tv = _mm512_set1_ps(t), e = _mm512_set1_ps(-rowscale[row]);
                    __m512 lo = _mm512_fmadd_ps(e, c_lo, _mm512_add_ps(_mm512_load_ps(c + 32 * i), n_lo));
                    __m512 hi = _mm512_fmadd_ps(e, c_hi, _mm512_add_ps(_mm512_load_ps(c + 32 * i + 16), n_hi));
                    uint32_t mask = (uint32_t)_mm512_cmp_ps_mask(lo, tv, _CMP_LT_OQ) |
                                    ((uint32_t)_mm512_cmp_ps_mask(hi, tv, _CMP_LT_OQ) << 16);
                    if (!mask) continue;
                    float v[32] __attribute__((aligned(64)));
                    _mm512_store_ps(v, lo);
                    _mm512_store_ps(v + 16, hi);
                    while (mask) {
                        int b = __builtin_ctz(mask);
                        mask &= mask - 1;
                        if (v[b] < t) insert(v[b], first + n0 + b, vals + row * m, idx + row * m, m, &t);
                    }
                    thr[row] = t;
                }
            }
        }
    }
    _tile_release();
}
