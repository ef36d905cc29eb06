/* A bf16 screen of squared distances on Intel AMX, for runtime/scoring/amx_screen.py (docs/speed.md).

   Per slab of gallery cells, every query row i gets value(i, j) = norm[j] + sum over segments of
   A_seg[i, :] . B_seg[:, j] - rowscale[i] * colnorm[j], the products in bf16 and the sums in fp32
   (AMX tiles), and the m smallest values of each row are kept in a running list. The caller bounds
   the error and re-computes the survivors exactly: this file only has to be fast, not exact.

   Layouts (bf16, K_pad a multiple of 32; columns past a segment's own width meet zero rows of B):
   - A "tiled": each 16 x 32 tile contiguous, tile (r / 16, k / 32) at ((r / 16) * K_pad / 32 + k / 32) * 512;
   - B "VNNI" tiled: the 16 x 32 tile of k pairs (k / 32, n / 16) contiguous at ((k / 32) * n_pad / 16 + n / 16) * 512,
     element (k, n) inside it at (k % 32 / 2) * 32 + (n % 16) * 2 + k % 2.
   Contiguous, 64-byte aligned tiles keep the loads from L2 in whole lines (strided or misaligned
   tiles ran over 2x slower). Query rows come in blocks of 32 and gallery columns in blocks of 32: two by
   two tiles of 16 x 16 sums.

   Two back-ends of the same screen, one source: built with -DSE_AMX the products run on AMX tiles
   (TDPBF16PS); without it on AVX512-BF16 (VDPBF16PS, Zen 4/5, Cooper Lake), which reads the same
   packed operands: B's 16 k-pairs x 16 columns of a tile row are one zmm register per pair, A's pair
   of a row one broadcast dword. Both instructions multiply bf16 exactly into fp32 and add with
   round-to-nearest-even, inputs and outputs' subnormals flushed: one bound covers both (amx_screen.py).

   The AVX-512 back-end also takes a coarse window as fp32 "taps" (window.parts 0): each fine column's value adds
   its four native cells times their bilinear weights, made per row block in fp32 (the window's values by cell,
   then the coarse part of every value, transposed 16 x 16 at a time), a few multiply-adds per value where the bf16
   parts take a product per window cell; the fine sums start from that part. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    const uint16_t *a; /* the row block's A tiles */
    const uint16_t *b; /* the slab's B, k_pad x n_pad */
    int64_t k_pad;     /* AMX: width, a multiple of 32; AVX-512: the pairs to multiply */
    int64_t stride;    /* AVX-512: tiles from one 16-row tile row of A to the next */
} segment;

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

#ifdef SE_AMX
/* Linux hands out AMX state only on request, once per process. */
int se_enable(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }
int se_taps(void) { return 0; } /* windows in bf16 parts only (window.parts 1 or 2) */
#else
int se_enable(void) { return 1; } /* AVX-512 state needs no request */
int se_taps(void) { return 1; } /* also windows as fp32 taps (window.parts 0) */
#endif

static inline uint16_t to_bf16(float x) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline int64_t b_at(int64_t k, int64_t n, int64_t n_pad) {
    return ((k / 32) * (n_pad / 16) + n / 16) * 512 + (k % 32 / 2) * 32 + (n % 16) * 2 + (k & 1);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* dst (k_pad x n_pad, B layout) = bf16(scale * (src[n * sn + k * sk] - mu[k])) for n < n_valid, k < k_valid,
   zero elsewhere; if given, colnorm[n] = |src[n] - mu| rounded up (the caller's error bound) and
   colsq[n] = |src[n] - mu|^2 (summed in double). parts = 3: three such blocks of k_pad rows, the value
   in two bf16 parts as hi, lo, hi, to meet an A of q's hi, hi, lo (three products, 16 bits each side). */
void se_pack_b(const float *src, int64_t sn, int64_t sk, int32_t n_valid, int32_t k_valid, const float *mu,
               float scale, int32_t n_pad, int32_t k_pad, int32_t parts, uint16_t *dst, float *colnorm, float *colsq) {
    memset(dst, 0, sizeof(uint16_t) * (size_t)n_pad * (size_t)k_pad * (size_t)parts);
    int64_t *at = (int64_t *)malloc(sizeof(int64_t) * (k_valid > 0 ? k_valid : 1)); /* b_at without divisions */
    for (int32_t k = 0; k < k_valid; k++) at[k] = b_at(k, 0, n_pad);
    int64_t lo_off = b_at(k_pad, 0, n_pad), hi2_off = b_at(2 * (int64_t)k_pad, 0, n_pad);
    for (int32_t n = 0; n < n_valid; n++) {
        double norm = 0.0;
        const float *s = src + n * sn;
        uint16_t *d = dst + (n / 16) * 512 + (n % 16) * 2;
        for (int32_t k = 0; k < k_valid; k++) {
            float v = s[k * sk] - (mu ? mu[k] : 0.0f);
            norm += (double)v * v;
            uint16_t hi = to_bf16(scale * v);
            d[at[k]] = hi;
            if (parts == 3) {
                d[lo_off + at[k]] = to_bf16(scale * v - from_bf16(hi));
                d[hi2_off + at[k]] = hi;
            }
        }
        if (colnorm) colnorm[n] = (float)sqrt(norm) * (1.0f + 1e-6f); /* rounded up */
        if (colsq) colsq[n] = (float)norm;
    }
    free(at);
}

typedef struct {
    const float *m;        /* a coarse level's products at native resolution: rows = query native cells */
    int64_t lds, cols;     /* leading dimension, valid columns (native gallery cells) */
    const int64_t *at;     /* four taps per fine query row ... */
    const float *w;        /* ... and their bilinear weights (may be zero) */
    const int64_t *starts; /* per slab: the first native gallery cell of the window it reads */
    int64_t k_pad;         /* window width, a multiple of 32 */
    const uint16_t *b;     /* per slab, parts k_pad x n_pad: the interpolation weights, for hi (then for lo) */
    float *rowmax;         /* raised to max |window value| per query row, for the caller's bound */
    int64_t parts;         /* 2: the values as hi and lo (16 bits); 1: hi alone (8 bits, a wider bound) */
    /* AVX-512: what each 16-column B tile reads. The 16 fine cells of a tile interpolate from a few native
       columns of 2 or 3 native rows: B is zero in every other row of the window. Tile t of slab s (t < n_pad / 16)
       has the runs of pairs [runs[2 u], runs[2 u + 1]) for u in [run_at[s * n_pad / 16 + t], run_at[... + 1]);
       pairs outside them are zero in all 16 columns (AMX multiplies the whole k_pad) */
    const int32_t *runs;
    const int64_t *run_at;
    /* AVX-512, parts = 0 ("taps"): the window's values stay fp32 and each fine column reads its (at most) four
       native cells directly: tap_cell[(s * n_pad + n) * 4 + t] and tap_w[...] for column n of slab s (-2 x
       bilinear; weight 0 and cell 0 past a column's taps) */
    const int32_t *tap_cell;
    const float *tap_w;
} window;

/* The A tiles of one window for query rows [r, r + 32): row i is sum_t w[i, t] m[at[i, t], start + c],
   c < k_pad (zero past cols), as k_pad columns of bf16 ("hi") then (parts = 2) k_pad of bf16(value - hi) ("lo"):
   hi + lo carries 16 bits. Tiled like A, rows past p are zero. Made here, next to their use,
   the tiles never leave L1. */
static void window_tiles(const window *wn, int64_t start, int64_t r, int64_t p, uint16_t *dst) {
    int64_t steps = wn->k_pad / 32, parts = wn->parts;
    memset(dst, 0, sizeof(uint16_t) * 2 * parts * steps * 512);
    for (int64_t i = r; i < r + 32 && i < p; i++) {
        const float *s0 = wn->m + wn->at[4 * i] * wn->lds + start, *s1 = wn->m + wn->at[4 * i + 1] * wn->lds + start;
        const float *s2 = wn->m + wn->at[4 * i + 2] * wn->lds + start, *s3 = wn->m + wn->at[4 * i + 3] * wn->lds + start;
        __m512 w0 = _mm512_set1_ps(wn->w[4 * i]), w1 = _mm512_set1_ps(wn->w[4 * i + 1]);
        __m512 w2 = _mm512_set1_ps(wn->w[4 * i + 2]), w3 = _mm512_set1_ps(wn->w[4 * i + 3]), big = _mm512_setzero_ps();
        uint16_t *row = dst + ((i - r) / 16) * parts * steps * 512 + ((i - r) % 16) * 32;
        for (int64_t c = 0; c < wn->k_pad; c += 16) {
            int64_t left = wn->cols - start - c;
            __mmask16 in = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            __m512 v = _mm512_mul_ps(w0, _mm512_maskz_loadu_ps(in, s0 + c));
            v = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(in, s1 + c), v);
            v = _mm512_fmadd_ps(w2, _mm512_maskz_loadu_ps(in, s2 + c), v);
            v = _mm512_fmadd_ps(w3, _mm512_maskz_loadu_ps(in, s3 + c), v);
            big = _mm512_max_ps(big, _mm512_abs_ps(v));
            __m256bh h = _mm512_cvtneps_pbh(v); /* round to nearest even */
            memcpy(row + (c / 32) * 512 + c % 32, &h, 32);
            if (parts == 2) {
                __m256i bits;
                memcpy(&bits, &h, 32);
                __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
                __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
                memcpy(row + (steps + c / 32) * 512 + c % 32, &l, 32);
            }
        }
        wn->rowmax[i] = fmaxf(wn->rowmax[i], _mm512_reduce_max_ps(big));
    }
}

#ifndef SE_AMX
/* r[i][j] becomes r[j][i]: the 16 x 16 block of floats in 16 registers. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* Taps mode: the window's values of query rows [r, r + 32) in fp32, by cell: cell c's 32 rows at dst + 32 c (zero in
   rows past p). (The caller bounds their size by Cauchy-Schwarz: no rowmax here.) */
static void window_columns(const window *wn, int64_t start, int64_t r, int64_t p, float *dst) {
    for (int64_t c = 0; c < wn->k_pad; c += 16) {
        int64_t left = wn->cols - start - c;
        __mmask16 in = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        const float *m = wn->m + start + c;
        for (int h = 0; h < 2; h++) {
            __m512 v[16];
            for (int u = 0; u < 16; u++) {
                int64_t i = r + 16 * h + u;
                if (i >= p) {
                    v[u] = _mm512_setzero_ps();
                    continue;
                }
                const int64_t *at = wn->at + 4 * i;
                const float *w = wn->w + 4 * i;
                __m512 x = _mm512_mul_ps(_mm512_set1_ps(w[0]), _mm512_maskz_loadu_ps(in, m + at[0] * wn->lds));
                x = _mm512_fmadd_ps(_mm512_set1_ps(w[1]), _mm512_maskz_loadu_ps(in, m + at[1] * wn->lds), x);
                x = _mm512_fmadd_ps(_mm512_set1_ps(w[2]), _mm512_maskz_loadu_ps(in, m + at[2] * wn->lds), x);
                v[u] = _mm512_fmadd_ps(_mm512_set1_ps(w[3]), _mm512_maskz_loadu_ps(in, m + at[3] * wn->lds), x);
            }
            transpose16(v);
            for (int u = 0; u < 16; u++) _mm512_store_ps(dst + 32 * (c + u) + 16 * h, v[u]);
        }
    }
}

/* Taps mode: the coarse part of every value of the row block, rows [r, r + 32) by the slab's n_pad columns, into
   dst (row-major, n_pad a row): column n is sum over the windows and their taps of weight x value, in fp32. */
static void coarse_block(const window *wins, const float *const *cols, int32_t n_win, int64_t s, int32_t n_pad,
                         float *dst) {
    float buf[2][16][16] __attribute__((aligned(64))); /* 16 columns by 32 rows, a half at a time to transpose */
    for (int32_t n0 = 0; n0 < n_pad; n0 += 16) {
        for (int u = 0; u < 16; u++) {
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            for (int32_t g = 0; g < n_win; g++) {
                if (!cols[g]) continue;
                int64_t q = ((int64_t)s * n_pad + n0 + u) * 4;
                const int32_t *cell = wins[g].tap_cell + q;
                const float *w = wins[g].tap_w + q;
                for (int t = 0; t < 4; t++) {
                    const float *x = cols[g] + 32 * (int64_t)cell[t];
                    __m512 wt = _mm512_set1_ps(w[t]);
                    lo = _mm512_fmadd_ps(wt, _mm512_load_ps(x), lo);
                    hi = _mm512_fmadd_ps(wt, _mm512_load_ps(x + 16), hi);
                }
            }
            _mm512_store_ps(buf[0][u], lo);
            _mm512_store_ps(buf[1][u], hi);
        }
        for (int h = 0; h < 2; h++) {
            __m512 v[16];
            for (int u = 0; u < 16; u++) v[u] = _mm512_load_ps(buf[h][u]);
            transpose16(v);
            for (int u = 0; u < 16; u++) _mm512_store_ps(dst + (16 * h + u) * (int64_t)n_pad + n0, v[u]);
        }
    }
}
#endif

static inline void insert(float v, int64_t index, float *vals, int64_t *idx, int32_t m, float *thr) {
    int32_t worst = 0;
    for (int32_t t = 1; t < m; t++)
        if (vals[t] > vals[worst]) worst = t;
    vals[worst] = v;
    idx[worst] = index;
    float top = vals[0];
    for (int32_t t = 1; t < m; t++) top = vals[t] > top ? vals[t] : top; /* no NaN here; fmaxf is a call */
    *thr = top;
}

/* Rows [r0, r1) (multiples of 32; rows past p are padding) against n_slab slabs of n_pad columns each
   (a multiple of 32). The fine segment: A tiled, B at fine_b + s * k_fine * n_pad for slab s.
   Each window adds a segment of parts k_pad, its A made per row block (window_tiles), its B at
   b + s * parts k_pad * n_pad. Slab s has norms[s * n_pad ...] (+inf past its cells) and colnorm[s * n_pad ...];
   its column c is gallery index base + s * cells_per_slab + c. Ranked value: products + norm[c] -
   rowscale[r] * colnorm[c] (a lower bound, the caller's error term removed). vals/idx: m per row, thr:
   the largest of them (+inf until full); a candidate enters when strictly below thr. */
#ifdef SE_AMX
void se_screen(int64_t r0, int64_t r1, int64_t p, int32_t n_slab, int32_t n_pad, const uint16_t *fine_a,
               const uint16_t *fine_b, int64_t k_fine, int32_t n_win, const window *wins, const float *norms,
               const float *colnorm, const float *rowscale, int64_t base, int64_t cells_per_slab, int32_t m,
               float *vals, int64_t *idx, float *thr) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    float c[32 * 32] __attribute__((aligned(64)));
    int64_t room = 0;
    for (int32_t g = 0; g < n_win; g++) room += 2 * wins[g].parts * (wins[g].k_pad / 32) * 512;
    uint16_t *wbuf = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (room ? room : 1));
    segment *sg = (segment *)malloc(sizeof(segment) * (1 + n_win));
    for (int32_t s = 0; s < n_slab; s++) { /* a slab's B stays in L2 while every row block passes */
        const float *nrm = norms + (int64_t)s * n_pad, *cn = colnorm + (int64_t)s * n_pad;
        int64_t first = base + s * cells_per_slab, n_seg = 1 + n_win;
        for (int64_t r = r0; r < r1; r += 32) {
            sg[0] = (segment){fine_a + (r / 16) * (k_fine / 32) * 512, fine_b + s * k_fine * n_pad, k_fine};
            uint16_t *next = wbuf;
            for (int32_t g = 0; g < n_win; g++) {
                window_tiles(&wins[g], wins[g].starts[s], r, p, next);
                int64_t width = wins[g].parts * wins[g].k_pad;
                sg[1 + g] = (segment){next, wins[g].b + s * width * n_pad, width};
                next += 2 * width / 32 * 512;
            }
            for (int32_t n0 = 0; n0 < n_pad; n0 += 32) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int32_t g = 0; g < n_seg; g++) {
                    int64_t steps = sg[g].k_pad / 32;
                    const uint16_t *a = sg[g].a, *b = sg[g].b + (n0 / 16) * 512;
                    for (int64_t k = 0; k < steps; k++, b += (n_pad / 16) * 512) {
                        _tile_loadd(4, a + k * 512, 64);
                        _tile_loadd(5, a + (steps + k) * 512, 64);
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
    free(wbuf);
    free(sg);
}
#else
/* One register tile: RT query rows (A at row i0 of its tile row) by NT B tiles of 16 columns, over one
   segment's pairs, added to acc. Each pair: NT loads of B, RT broadcasts of A, RT x NT VDPBF16PS; 8 x 3
   keeps 24 accumulators in the 32 zmm registers (8 x 2 and 4 x 2 ran slower: docs/speed.md). */
#ifndef RT
#define RT 8
#endif
#define NT_MAX 3
static inline __attribute__((always_inline)) void block_products(const uint16_t *a, const uint16_t *b, int64_t pairs,
                                                                 int64_t b_step, int nt, __m512 acc[RT][NT_MAX]) {
    for (int64_t k = 0; k < pairs; k += 16, a += 512, b += b_step) {
        int n = pairs - k < 16 ? (int)(pairs - k) : 16; /* a window's last tile: the pairs B has */
        for (int kp = 0; kp < n; kp++) {
            __m512bh bt[NT_MAX];
            for (int t = 0; t < nt; t++) bt[t] = (__m512bh)_mm512_load_si512((const void *)(b + t * 512 + kp * 32));
            for (int i = 0; i < RT; i++) {
                int32_t pair; /* an asm broadcast operand ({1to16}) ran 2.4x slower: GCC spilled the accumulators */
                memcpy(&pair, a + i * 32 + 2 * kp, 4);
                __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                for (int t = 0; t < nt; t++) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], av, bt[t]);
            }
        }
    }
}

/* A window's part of one register tile, as the AVX-512 kernel reads it: A's hi (and lo) tiles at the tile's
   block's first row, the slab's B (hi: lo's weights are the same) and the runs of its B tiles. */
typedef struct {
    const uint16_t *hi, *lo; /* lo: NULL with one part */
    const uint16_t *b;
    const int32_t *runs;
    const int64_t *run_at; /* the slab's first B tile */
    int64_t stride;        /* A tiles from one 16-row tile row to the next */
} coarse;

/* The products of one window for column tile t (16 columns) over its runs of pairs, into acc[.][t]. Each pair:
   one B load, the hi and lo broadcasts against it (both parts multiply the same weights). */
static inline __attribute__((always_inline)) void coarse_products(const coarse *cw, int64_t i_off, int64_t tile,
                                                                  int t, int64_t b_step, __m512 acc[RT][NT_MAX]) {
    const uint16_t *b = cw->b + (tile + t) * 512, *hi = cw->hi + i_off, *lo = cw->lo ? cw->lo + i_off : NULL;
    for (int64_t u = cw->run_at[tile + t]; u < cw->run_at[tile + t + 1]; u++) {
        for (int64_t k = cw->runs[2 * u]; k < cw->runs[2 * u + 1]; k++) {
            int64_t step = k >> 4, kp = k & 15;
            __m512bh bt = (__m512bh)_mm512_load_si512((const void *)(b + step * b_step + kp * 32));
            const uint16_t *ah = hi + step * 512 + 2 * kp;
            for (int i = 0; i < RT; i++) {
                int32_t pair;
                memcpy(&pair, ah + i * 32, 4);
                acc[i][t] = _mm512_dpbf16_ps(acc[i][t], (__m512bh)_mm512_set1_epi32(pair), bt);
            }
            if (lo) {
                const uint16_t *al = lo + step * 512 + 2 * kp;
                for (int i = 0; i < RT; i++) {
                    int32_t pair;
                    memcpy(&pair, al + i * 32, 4);
                    acc[i][t] = _mm512_dpbf16_ps(acc[i][t], (__m512bh)_mm512_set1_epi32(pair), bt);
                }
            }
        }
    }
}

/* Rows [i0, i0 + RT) of the row block at r against columns [n0, n0 + 16 nt) of slab s: the fine products, each
   window's over the runs its column tiles read (taps: the sums start from the row block's coarse part), then the
   ranked values into the running lists (as in the AMX se_screen above). */
static inline __attribute__((always_inline)) void register_tile(const segment *fine, const coarse *cw,
                                                                const float *start, int32_t n_win,
                                                                int64_t r, int i0, int32_t n0, int nt, int32_t n_pad,
                                                                const float *nrm, const float *cn,
                                                                const float *rowscale, int64_t first, int32_t m,
                                                                float *vals, int64_t *idx, float *thr) {
    __m512 acc[RT][NT_MAX]; /* the sums start from the taps' coarse part, if any (start: row-major, n_pad a row) */
    for (int i = 0; i < RT; i++)
        for (int t = 0; t < NT_MAX; t++)
            acc[i][t] = start && t < nt ? _mm512_load_ps(start + (int64_t)(i0 + i) * n_pad + n0 + 16 * t)
                                        : _mm512_setzero_ps();
    int64_t b_step = (int64_t)(n_pad / 16) * 512;
    block_products(fine->a + (i0 / 16) * fine->stride * 512 + (i0 % 16) * 32, fine->b + (n0 / 16) * 512, fine->k_pad,
                   b_step, nt, acc);
    for (int32_t g = 0; g < n_win; g++) { /* t constant in each call: acc stays in registers */
        if (!cw[g].hi) continue; /* taps: in start */
        int64_t i_off = (i0 / 16) * cw[g].stride * 512 + (i0 % 16) * 32;
        coarse_products(&cw[g], i_off, n0 / 16, 0, b_step, acc);
        if (nt > 1) coarse_products(&cw[g], i_off, n0 / 16, 1, b_step, acc);
        if (nt > 2) coarse_products(&cw[g], i_off, n0 / 16, 2, b_step, acc);
    }
    for (int i = 0; i < RT; i++) {
        int64_t row = r + i0 + i;
        float t = thr[row];
        __m512 tv = _mm512_set1_ps(t), e = _mm512_set1_ps(-rowscale[row]);
        float v[16 * NT_MAX] __attribute__((aligned(64)));
        uint64_t mask = 0;
        for (int u = 0; u < nt; u++) {
            __m512 sum = acc[i][u];
            __m512 x = _mm512_fmadd_ps(e, _mm512_loadu_ps(cn + n0 + 16 * u),
                                       _mm512_add_ps(sum, _mm512_loadu_ps(nrm + n0 + 16 * u)));
            mask |= (uint64_t)_mm512_cmp_ps_mask(x, tv, _CMP_LT_OQ) << (16 * u);
            _mm512_store_ps(v + 16 * u, x);
        }
        while (mask) {
            int b = __builtin_ctzll(mask);
            mask &= mask - 1;
            if (v[b] < t) insert(v[b], first + n0 + b, vals + row * m, idx + row * m, m, &t);
        }
        thr[row] = t;
    }
}

void se_screen(int64_t r0, int64_t r1, int64_t p, int32_t n_slab, int32_t n_pad, const uint16_t *fine_a,
               const uint16_t *fine_b, int64_t k_fine, int32_t n_win, const window *wins, const float *norms,
               const float *colnorm, const float *rowscale, int64_t base, int64_t cells_per_slab, int32_t m,
               float *vals, int64_t *idx, float *thr) {
    int64_t room = 0, taps = 0; /* in uint16: bf16 tiles, or (taps) 32 rows of k_pad floats */
    for (int32_t g = 0; g < n_win; g++) {
        room += wins[g].parts ? 2 * wins[g].parts * (wins[g].k_pad / 32) * 512 : 2 * 32 * wins[g].k_pad;
        taps |= !wins[g].parts;
    }
    uint16_t *wbuf = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (room ? room : 1));
    float *start = taps ? (float *)aligned_alloc(64, sizeof(float) * 32 * n_pad) : NULL; /* the taps' coarse part */
    coarse *cw = (coarse *)calloc(n_win ? n_win : 1, sizeof(coarse));
    const float **cols = (const float **)calloc(n_win ? n_win : 1, sizeof(float *));
    int64_t tiles = n_pad / 16;
    for (int32_t s = 0; s < n_slab; s++) {
        const float *nrm = norms + (int64_t)s * n_pad, *cn = colnorm + (int64_t)s * n_pad;
        int64_t first = base + s * cells_per_slab;
        for (int64_t r = r0; r < r1; r += 32) {
            /* the fine segment; each window's A tiles (hi then lo per 16-row tile row), the slab's B and runs, or
               (taps) its values by cell, then the coarse part of the whole row block */
            segment fine = {fine_a + (r / 16) * (k_fine / 32) * 512, fine_b + s * k_fine * n_pad, k_fine / 2, k_fine / 32};
            uint16_t *next = wbuf;
            for (int32_t g = 0; g < n_win; g++) {
                if (!wins[g].parts) {
                    window_columns(&wins[g], wins[g].starts[s], r, p, (float *)next);
                    cols[g] = (const float *)next;
                    next += 2 * 32 * wins[g].k_pad;
                    continue;
                }
                window_tiles(&wins[g], wins[g].starts[s], r, p, next);
                int64_t steps = wins[g].k_pad / 32, width = wins[g].parts * wins[g].k_pad;
                cw[g] = (coarse){next,        wins[g].parts == 2 ? next + steps * 512 : NULL,
                                 wins[g].b + s * width * n_pad, wins[g].runs, wins[g].run_at + s * tiles,
                                 wins[g].parts * steps};
                next += 2 * width / 32 * 512;
            }
            if (taps) coarse_block(wins, cols, n_win, s, n_pad, start);
            for (int32_t n0 = 0; n0 < n_pad;) { /* 48 columns at a time, then what is left (16 or 32) */
                int nt = n_pad - n0 >= 48 ? 3 : (n_pad - n0) / 16;
                for (int i0 = 0; i0 < 32 && r + i0 < p; i0 += RT) { /* rows past p: padding, never read */
                    if (nt == 3)
                        register_tile(&fine, cw, start, n_win, r, i0, n0, 3, n_pad, nrm, cn, rowscale, first, m, vals, idx, thr);
                    else if (nt == 2)
                        register_tile(&fine, cw, start, n_win, r, i0, n0, 2, n_pad, nrm, cn, rowscale, first, m, vals, idx, thr);
                    else
                        register_tile(&fine, cw, start, n_win, r, i0, n0, 1, n_pad, nrm, cn, rowscale, first, m, vals, idx, thr);
                }
                n0 += 16 * nt;
            }
        }
    }
    free(wbuf);
    free(start);
    free(cw);
    free(cols);
}
#endif
