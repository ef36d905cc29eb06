/* Fused distance and selection (runtime/scoring/fused.py, docs/speed.md "The fused kernels").

   Expanded distances |g|^2 - 2 q.g in fp32, a register tile of RB query rows by NP panels of VW
   gallery rows at a time; each query row's running list of the m smallest (m = kappa + SPARE) is
   kept sorted in place, so the distance matrix is never written. The gallery is packed into panels
   (VW rows side by side, channel-major) and walked in chunks that stay in L2 while every row tile
   of this thread reads them.

   One source for every instruction set: GCC/Clang vector extensions of VW floats, compiled once per
   level (-DVW=16 with AVX-512, 8 with AVX2+FMA, 4 with NEON or SSE2) and chosen at run time by the
   CPU's features. Lists are sorted ascending; a candidate enters when strictly below the last, after
   any equal value: ties keep the earlier (lower) gallery index. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#ifndef VW
#define VW 4
#endif
#ifndef RB
#define RB 4
#endif
#define NP 2
#ifndef RBL
#define RBL RB /* query rows per register tile of sf_levels */
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf ld(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* an unaligned store typed as floats: memcpy's would alias everything, and GCC then re-reads every
   pointer and count of a loop after each store */
typedef float vf_unaligned __attribute__((vector_size(VW * 4), aligned(4)));
static inline void st(float *p, vf v) { *(vf_unaligned *)p = v; }

int32_t sf_width(void) { return VW; }
int32_t sf_rows(void) { return RB; }

/* rows [0, n) of g (row stride ldg floats) into npan panels of VW rows, channel-major: panel p holds
   g[p*VW + l][k] at panels[(p*d + k)*VW + l]; rows past n are zero with norm +inf (never enter). */
void sf_pack(const float *g, int64_t n, int64_t d, int64_t ldg, const float *norms, int64_t npan, float *panels,
             float *pnorms) {
    for (int64_t p = 0; p < npan; p++) {
        float *out = panels + p * d * VW;
        for (int l = 0; l < VW; l++) {
            int64_t row = p * VW + l;
            if (row < n) {
                const float *src = g + row * ldg;
                for (int64_t k = 0; k < d; k++) out[k * VW + l] = src[k];
                pnorms[p * VW + l] = norms[row];
            } else {
                for (int64_t k = 0; k < d; k++) out[k * VW + l] = 0.0f;
                pnorms[p * VW + l] = INFINITY;
            }
        }
    }
}

/* sf_pack for each of H grid rows of W cells: row Y's cells into its npr panels (sf_levels' layout) */
void sf_pack_rows(const float *g, int64_t H, int64_t W, int64_t d, const float *norms, int64_t npr, float *panels,
                  float *pnorms) {
    for (int64_t y = 0; y < H; y++)
        sf_pack(g + y * W * d, W, d, d, norms + y * W, npr, panels + y * npr * d * VW, pnorms + y * npr * VW);
}

#if (VW == 16 && defined(__AVX512F__)) || (VW == 8 && defined(__AVX2__))
#define SF_INSERT16 1
/* insert() into a list of 16 without exact distances (kappa = 1) in registers, no branch per slot. Not inlined:
   its constants, held in registers across the fine tile's loop, cost the accumulators theirs (AVX2 has 16:
   WRN50x2's 256 channels ran 0.72 -> 1.15 s at K = 20 with it inlined; on AVX-512 the same either way) */
static __attribute__((noinline)) void insert16(float *v, int64_t *ix, float d, int64_t id) {
#if VW == 16
    { /* the list in one register, moved up a lane past d */
        __m512 vv = _mm512_loadu_ps(v);
        __mmask16 le = _mm512_cmp_ps_mask(vv, _mm512_set1_ps(d), _CMP_LE_OQ); /* a prefix: the list is sorted */
        int pos = __builtin_popcount((unsigned)le);
        __mmask16 after = (__mmask16)(0xFFFFu << (pos + 1)), at = (__mmask16)(1u << pos);
        const __m512i up = _mm512_set_epi32(14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0);
        vv = _mm512_mask_mov_ps(vv, after, _mm512_permutexvar_ps(up, vv));
        _mm512_storeu_ps(v, _mm512_mask_mov_ps(vv, at, _mm512_set1_ps(d)));
        __m512i lo = _mm512_loadu_si512(ix), hi = _mm512_loadu_si512(ix + 8);
        __m512i lo_up = _mm512_permutexvar_epi64(_mm512_set_epi64(6, 5, 4, 3, 2, 1, 0, 0), lo);
        __m512i hi_up = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(14, 13, 12, 11, 10, 9, 8, 7), hi);
        __m512i idv = _mm512_set1_epi64(id);
        lo = _mm512_mask_mov_epi64(_mm512_mask_mov_epi64(lo, (__mmask8)after, lo_up), (__mmask8)at, idv);
        hi = _mm512_mask_mov_epi64(_mm512_mask_mov_epi64(hi, (__mmask8)(after >> 8), hi_up), (__mmask8)(at >> 8), idv);
        _mm512_storeu_si512(ix, lo);
        _mm512_storeu_si512(ix + 8, hi);
    }
#else
    { /* the same in two registers of values and four of indices */
        __m256 d8 = _mm256_set1_ps(d), v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        int pos = __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v0, d8, _CMP_LE_OQ))) +
                  __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v1, d8, _CMP_LE_OQ)));
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), up = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
        __m256i p = _mm256_set1_epi32(pos), p8 = _mm256_set1_epi32(pos - 8);
        __m256 u0 = _mm256_permutevar8x32_ps(v0, up);
        __m256 u1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(v1, up), _mm256_permutevar8x32_ps(v0, _mm256_set1_epi32(7)), 1);
        __m256 a0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, p)), a1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, p8));
        __m256 e0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, p)), e1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, p8));
        _mm256_storeu_ps(v, _mm256_blendv_ps(_mm256_blendv_ps(v0, u0, a0), d8, e0));
        _mm256_storeu_ps(v + 8, _mm256_blendv_ps(_mm256_blendv_ps(v1, u1, a1), d8, e1));
        __m256i idv = _mm256_set1_epi64x(id), carry = _mm256_set1_epi64x(0);
        for (int q = 0; q < 4; q++) { /* four indices a register, each moved up a lane, the last carried over */
            __m256i x = _mm256_loadu_si256((const __m256i *)(ix + 4 * q));
            __m256i moved = _mm256_blend_epi32(_mm256_permute4x64_epi64(x, _MM_SHUFFLE(2, 1, 0, 0)), carry, 0x03);
            carry = _mm256_permute4x64_epi64(x, _MM_SHUFFLE(3, 3, 3, 3));
            __m256i slot = _mm256_setr_epi64x(4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3), at = _mm256_set1_epi64x(pos);
            __m256i after = _mm256_cmpgt_epi64(slot, at), here = _mm256_cmpeq_epi64(slot, at);
            x = _mm256_blendv_epi8(_mm256_blendv_epi8(x, moved, after), idv, here);
            _mm256_storeu_si256((__m256i *)(ix + 4 * q), x);
        }
    }
#endif
}
#endif

/* d (< v[m-1]) into the sorted list v/ix/ex of m, after any equal value; its exact distance unset.
   ex NULL: a list without exact distances (always inlined, so that test is made once at compile time). */
static inline __attribute__((always_inline)) void insert(float *v, int64_t *ix, float *ex, int32_t m, float d,
                                                         int64_t id) {
#ifdef SF_INSERT16
    if (!ex && m == 16) {
        insert16(v, ix, d, id);
        return;
    }
#endif
    int32_t i = m - 1;
    while (i > 0 && v[i - 1] > d) {
        v[i] = v[i - 1];
        ix[i] = ix[i - 1];
        if (ex) ex[i] = ex[i - 1];
        i--;
    }
    v[i] = d;
    ix[i] = id;
    if (ex) ex[i] = INFINITY;
}

static inline __attribute__((always_inline)) void offer(vf dist, int64_t first, float *v, int64_t *ix, float *ex,
                                                        int32_t m) {
    vi hit = dist < v[m - 1];
#if VW == 16 && defined(__AVX512F__)
    if (!_mm512_test_epi32_mask((__m512i)hit, (__m512i)hit)) return;
#elif VW == 8 && defined(__AVX2__)
    if (_mm256_testz_si256((__m256i)hit, (__m256i)hit)) return;
#elif VW == 4 && defined(__SSE4_1__)
    if (_mm_testz_si128((__m128i)hit, (__m128i)hit)) return;
#elif VW == 4 && defined(__aarch64__)
    if (!vmaxvq_u32((uint32x4_t)hit)) return;
#else
    int any = 0;
    for (int l = 0; l < VW; l++) any |= hit[l];
    if (!any) return;
#endif
    for (int l = 0; l < VW; l++)
        if (dist[l] < v[m - 1]) insert(v, ix, ex, m, dist[l], first + l);
}

/* query rows [r0, r1) of q (row stride d) against npan panels (npan a multiple of NP); panel p's
   lane l is gallery index base + p*VW + l. vals/idx/ex: m slots per query row (row-major, whole
   query), sorted by vals; ex moves with its candidate (its exact distance, set by the caller). */
void sf_search(int64_t r0, int64_t r1, const float *q, int64_t d, const float *panels, const float *pnorms,
               int64_t npan, int64_t base, int32_t m, float *vals, int64_t *idx, float *ex) {
    int64_t chunk = (192 << 10) / (d * VW * 4); /* panels per L2 chunk */
    chunk = chunk / NP * NP;
    if (chunk < NP) chunk = NP;
    for (int64_t c0 = 0; c0 < npan; c0 += chunk) {
        int64_t c1 = c0 + chunk < npan ? c0 + chunk : npan;
        for (int64_t r = r0; r < r1; r += RB) {
            int nr = r1 - r < RB ? (int)(r1 - r) : RB;
            const float *qr[RB];
            for (int i = 0; i < RB; i++) qr[i] = q + (r + (i < nr ? i : nr - 1)) * d;
            for (int64_t pn = c0; pn < c1; pn += NP) {
                vf acc[RB][NP];
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < NP; j++) acc[i][j] = (vf){0};
                const float *pa = panels + pn * d * VW;
                for (int64_t k = 0; k < d; k++) {
                    vf b[NP];
                    for (int j = 0; j < NP; j++) b[j] = ld(pa + (j * d + k) * VW);
                    for (int i = 0; i < RB; i++) {
                        vf a = (vf){0} + qr[i][k];
                        for (int j = 0; j < NP; j++) acc[i][j] += a * b[j];
                    }
                }
                for (int j = 0; j < NP; j++) {
                    vf nrm = ld(pnorms + (pn + j) * VW);
                    int64_t first = base + (pn + j) * VW;
                    for (int i = 0; i < nr; i++) {
                        int64_t row = r + i;
                        offer(nrm - 2.0f * acc[i][j], first, vals + row * m, idx + row * m, ex + row * m, m);
                    }
                }
            }
        }
    }
}

/* ---- the concatenated pyramid at per-level cost -------------------------------------------------

   sf_levels: query rows (qy, 0..W) of the fine grid, qy in [qy0, qy1), against one gallery image,
   without upsampling its coarse levels to the fine grid (runtime/scoring/fused_levels.py, docs/speed.md
   "The fused kernel at per-level cost"). A coarse level enters through its native query cells' products
   with the gallery's level at native resolution, N[y][(a, b)][x] = Q[a, b] . G[y, x] (or, where a lane
   permutation cannot reach a group's x taps, upsampled along x first: Nx[y][(a, b)][X] = Q[a, b] . Gx[y, X]).
   For a gallery row Y, the gallery's y taps (and x taps, from N) give Ng (once for every query row of the part); for a
   query row qy, the query's y taps on Ng give the level's block with the query still at native x;
   its x taps, summed over the levels, give the (W x wpad) block of <Uq, Ug> that starts the fine
   level's register tiles: a few multiply-adds per pair and coarse level where the upsampled
   concatenation took C_l. */
typedef struct {
    int64_t h, w, row0, rows, ld; /* Nx: h blocks of ld = rows * w * wn floats, one per gallery native row y,
                                     each the native query cells of rows [row0, row0 + rows) by wn */
    int64_t wn;                   /* wpad: Nx's gallery side upsampled along x (Gx); w: native (N), the x taps
                                     made in the Ng pass by the group tables below */
    const float *nx;
    const int32_t *ya0, *ya1, *xb0, *xb1; /* taps along the fine grid's y (H) and x (W) */
    const float *yw0, *yw1, *xw0, *xw1;
    const int32_t *gbase, *gidx; /* native N: per group of VW fine columns, the first native column its taps
                                    read, and its lanes' two taps from there (2 VW); all within VW columns */
    const float *gw;             /* ... and their weights (2 VW) */
} sf_level;

/* v[base + idx[l]] for each lane l, idx < VW: one register permutation where the ISA has one */
static inline vf gather_lanes(const float *v, const int32_t *idx) {
    vf x = ld(v);
#if VW == 16 && defined(__AVX512F__)
    __m512i i;
    memcpy(&i, idx, sizeof i);
    return (vf)_mm512_permutexvar_ps(i, (__m512)x);
#elif VW == 8 && defined(__AVX2__)
    __m256i i;
    memcpy(&i, idx, sizeof i);
    return (vf)_mm256_permutevar8x32_ps((__m256)x, i);
#else
    vf r;
    for (int l = 0; l < VW; l++) r[l] = x[idx[l]];
    return r;
#endif
}

/* offer() for lists without exact distances, the lanes that beat the list's last visited by their mask bits
   (a list's first block sends most lanes of a vector in) */
static inline __attribute__((always_inline)) void offer_lanes(vf dist, int64_t first, float *v, int64_t *ix, int32_t m) {
    vi hit = dist < v[m - 1];
    uint32_t mask = 0;
#if VW == 16 && defined(__AVX512F__)
    mask = _mm512_test_epi32_mask((__m512i)hit, (__m512i)hit);
#elif VW == 8 && defined(__AVX2__)
    mask = (uint32_t)_mm256_movemask_ps((__m256)hit);
#else
    for (int l = 0; l < VW; l++) mask |= (uint32_t)(hit[l] != 0) << l;
#endif
    while (mask) {
        int l = __builtin_ctz(mask);
        mask &= mask - 1;
        if (dist[l] < v[m - 1]) insert(v, ix, NULL, m, dist[l], first + l);
    }
}

/* The fine level's register tile of sf_levels: query cells (qy, r..r+nr) against np panels from pn of one
   gallery row (index first + lane), started by the coarse levels' block blk (W x wpad). */
static inline __attribute__((always_inline)) void levels_tile(int np, int64_t qy, int64_t r, int nr, int64_t pn,
                                                              int64_t W, int64_t wpad, const float *qf, int64_t cf,
                                                              const float *prow, const float *nrow, const float *blk,
                                                              int64_t first, int32_t m, float *vals, int64_t *idx) {
    const float *qr[RBL];
    vf acc[RBL][NP];
    for (int i = 0; i < RBL; i++) {
        int64_t x = r + (i < nr ? i : nr - 1);
        qr[i] = qf + (qy * W + x) * cf;
        for (int j = 0; j < np; j++) acc[i][j] = ld(blk + x * wpad + (pn + j) * VW);
    }
    const float *pa = prow + pn * cf * VW;
    for (int64_t k = 0; k < cf; k++) {
        vf b[NP];
        for (int j = 0; j < np; j++) b[j] = ld(pa + (j * cf + k) * VW);
        for (int i = 0; i < RBL; i++) {
            vf a = (vf){0} + qr[i][k];
            for (int j = 0; j < np; j++) acc[i][j] += a * b[j];
        }
    }
    for (int j = 0; j < np; j++) {
        vf nrm = ld(nrow + (pn + j) * VW);
        for (int i = 0; i < nr; i++) {
            int64_t row = qy * W + r + i;
            offer_lanes(nrm - 2.0f * acc[i][j], first + (pn + j) * VW, vals + row * m, idx + row * m, m);
        }
    }
}

/* qf: fine query rows (H*W x cf); panels: per fine gallery row Y, wpad/VW panels of cf x VW; pnorms: H x wpad
   (+inf past W); scratch: (sum_l (rows_l + 1) w_l + W) wpad floats. Lists as sf_search's, without exact
   distances (the caller re-computes those of the candidates that may belong); gallery cell (Y, X) is
   index base + Y*W + X. */
void sf_levels(int64_t qy0, int64_t qy1, int64_t H, int64_t W, int64_t wpad, const float *qf, int64_t cf,
               const float *panels, const float *pnorms, int32_t nlev, const sf_level *lev, int64_t base, int32_t m,
               float *vals, int64_t *idx, float *scratch) {
    int64_t npr = wpad / VW; /* panels per gallery row */
    float *ng[8], *bx[8];    /* per coarse level: Nx with the gallery's y taps, rows x w x wpad; then with the
                                query's too, w x wpad (its block with the query still at native x) */
    int32_t nl = nlev < 8 ? nlev : 8;
    float *at = scratch;
    for (int32_t l = 0; l < nl; l++) {
        ng[l] = at;
        at += lev[l].rows * lev[l].w * wpad;
        bx[l] = at;
        at += lev[l].w * wpad;
    }
    float *blk = at; /* W x wpad: the coarse levels' <Uq, Ug> for a pair of fine rows */
    for (int64_t Y = 0; Y < H; Y++) {
        for (int32_t l = 0; l < nl; l++) { /* the gallery row's y taps, once for every query row of this part */
            const sf_level *L = lev + l;
            vf v0 = (vf){0} + L->yw0[Y], v1 = (vf){0} + L->yw1[Y];
            const float *n0 = L->nx + L->ya0[Y] * L->ld, *n1 = L->nx + L->ya1[Y] * L->ld;
            float *o = ng[l];
            if (!L->gbase) { /* Nx: the gallery's x taps are in it */
                for (int64_t x = 0; x < L->ld; x += VW) st(o + x, v0 * ld(n0 + x) + v1 * ld(n1 + x));
                continue;
            }
            /* native N: the y taps on a cell's w columns, then the gallery's x taps by lane permutations */
            float yb[256 + VW] = {0}; /* w <= 256 (fused_levels._Coarse), and a permutation's reach past it */
            int64_t w = L->w, groups = wpad / VW;
            for (int64_t c = 0; c < L->rows * w; c++, n0 += w, n1 += w, o += wpad) {
                for (int64_t b = 0; b < w; b++) yb[b] = L->yw0[Y] * n0[b] + L->yw1[Y] * n1[b];
                for (int64_t g = 0; g < groups; g++) {
                    const float *from = yb + L->gbase[g];
                    const int32_t *ix = L->gidx + 2 * VW * g;
                    const float *wt = L->gw + 2 * VW * g;
                    st(o + g * VW, ld(wt) * gather_lanes(from, ix) + ld(wt + VW) * gather_lanes(from, ix + VW));
                }
            }
        }
        for (int64_t qy = qy0; qy < qy1; qy++) {
            for (int32_t l = 0; l < nl; l++) { /* the query row's y taps */
                const sf_level *L = lev + l;
                vf u0 = (vf){0} + L->yw0[qy], u1 = (vf){0} + L->yw1[qy];
                int64_t size = L->w * wpad;
                const float *n0 = ng[l] + (L->ya0[qy] - L->row0) * size, *n1 = ng[l] + (L->ya1[qy] - L->row0) * size;
                float *o = bx[l];
                for (int64_t x = 0; x < size; x += VW) st(o + x, u0 * ld(n0 + x) + u1 * ld(n1 + x));
            }
            for (int64_t x = 0; x < W; x++) { /* the query's x taps, every level summed: the (W x wpad) block */
                const float *p0[8], *p1[8];
                vf w0[8], w1[8];
                for (int32_t l = 0; l < nl; l++) {
                    p0[l] = bx[l] + lev[l].xb0[x] * wpad;
                    p1[l] = bx[l] + lev[l].xb1[x] * wpad;
                    w0[l] = (vf){0} + lev[l].xw0[x];
                    w1[l] = (vf){0} + lev[l].xw1[x];
                }
                float *o = blk + x * wpad;
                for (int64_t c = 0; c < wpad; c += VW) {
                    vf v = (vf){0};
                    for (int32_t l = 0; l < nl; l++) v += w0[l] * ld(p0[l] + c) + w1[l] * ld(p1[l] + c);
                    st(o + c, v);
                }
            }
            const float *prow = panels + Y * npr * cf * VW, *nrow = pnorms + Y * wpad;
            /* panels outer: a pair (cf x 2 VW floats) stays in L1 while every row tile reads it */
            for (int64_t pn = 0; pn < npr; pn += NP) {
                int np = npr - pn < NP ? (int)(npr - pn) : NP; /* an odd panel at the row's end: no padding */
                for (int64_t r = 0; r < W; r += RBL) {
                    int nr = W - r < RBL ? (int)(W - r) : RBL;
                    if (np == NP)
                        levels_tile(NP, qy, r, nr, pn, W, wpad, qf, cf, prow, nrow, blk, base + Y * W, m, vals, idx);
                    else
                        levels_tile(1, qy, r, nr, pn, W, wpad, qf, cf, prow, nrow, blk, base + Y * W, m, vals, idx);
                }
            }
        }
    }
}

/* The exact squared distances of candidates of sf_levels' search: candidate k is query cell rows[k] against
   gallery cell cells[k] (both flat on the W-wide fine grid), each side's upsampled value of a level made
   from its native map by its four taps (two along each axis; a level at the fine grid is read as is), the
   taps' sums, the differences and the squares in float64, rounded to fp32 once: the distance of the
   upsampled, concatenated rows without their fp32 rounding (an identical image is at 0). */
typedef struct {
    const float *g; /* h x w x c */
    int64_t h, w, c;
    const int32_t *ya0, *ya1, *xb0, *xb1; /* NULL: a level at the fine grid */
    const float *yw0, *yw1, *xw0, *xw1;
} sf_source;

/* level S's upsampled value at fine cell (y, x), channel by channel into v (float64) */
static void upsampled(const sf_source *S, int64_t y, int64_t x, double *v) {
    int64_t c = S->c;
    if (!S->ya0) {
        const float *g = S->g + (y * S->w + x) * c;
        for (int64_t ch = 0; ch < c; ch++) v[ch] = g[ch];
        return;
    }
    const float *g00 = S->g + (S->ya0[y] * S->w + S->xb0[x]) * c, *g01 = S->g + (S->ya0[y] * S->w + S->xb1[x]) * c;
    const float *g10 = S->g + (S->ya1[y] * S->w + S->xb0[x]) * c, *g11 = S->g + (S->ya1[y] * S->w + S->xb1[x]) * c;
    double w00 = (double)S->yw0[y] * S->xw0[x], w01 = (double)S->yw0[y] * S->xw1[x];
    double w10 = (double)S->yw1[y] * S->xw0[x], w11 = (double)S->yw1[y] * S->xw1[x];
    for (int64_t ch = 0; ch < c; ch++) v[ch] = w00 * g00[ch] + w01 * g01[ch] + w10 * g10[ch] + w11 * g11[ch];
}

/* q, g: nlev sources each (the query's levels, one gallery image's); work: 2 x (largest c) doubles */
void sf_exact_levels(int64_t n, const int64_t *rows, const int64_t *cells, int64_t W, int32_t nlev, const sf_source *q,
                     const sf_source *g, double *work, float *out) {
    int64_t cmax = 0;
    for (int32_t l = 0; l < nlev; l++) cmax = q[l].c > cmax ? q[l].c : cmax;
    double *a = work, *b = work + cmax;
    for (int64_t k = 0; k < n; k++) {
        double acc = 0.0;
        for (int32_t l = 0; l < nlev; l++) {
            upsampled(q + l, rows[k] / W, rows[k] % W, a);
            upsampled(g + l, cells[k] / W, cells[k] % W, b);
            for (int64_t ch = 0; ch < q[l].c; ch++) {
                double t = a[ch] - b[ch];
                acc += t * t;
            }
        }
        out[k] = (float)acc;
    }
}

/* ---- screens: each kept value is a lower bound of the expanded distance -------------------------

   sf_screen_bf16 ranks value = nb_j - 2 q_i.g_j - e_i gn_j with bf16 operands (AVX512-BF16 VDPBF16PS),
   sf_screen_int8 a like value from int8 operands (AVX512-VNNI VPDPBUSD), where the caller has made
   the per-lane and per-row terms so that the value is at most the true expanded distance
   (runtime/scoring/screens.py). */

#if defined(__AVX512BF16__) && VW == 16
/* bf16 operands: q (rows of d2 channel pairs, bf16 bits packed in uint32) against panels of d2 pairs
   by VW lanes (pair kk of lane l at panels[(p*d2 + kk)*VW + l]). */
int32_t sf_has_bf16(void) { return 1; }

static inline uint16_t to_bf16(float x) { /* round to nearest even, as runtime/scoring/amx_screen.py bf16() */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* The bf16 screen's operands of gallery rows [0, n) of g (n x d fp32) in one pass: b = g - mu in
   float64, rounded to fp32 then bf16 into panels of d2 channel pairs; pnorms = |b|^2 (1 - 2^-20) - t
   and pgn = |b| (squares summed in float64), +inf and 0 on padded lanes (runtime/scoring/screens.py). */
void sf_prep_bf16(const float *g, int64_t n, int64_t d, const double *mu, int64_t d2, int64_t p0, int64_t p1, double t,
                  uint32_t *panels, float *pnorms, float *pgn) { /* panels [p0, p1): one part per thread */
    /* 16 channels at a time: the same values and bits as to_bf16((float)((double)g - mu)) channel by channel
       (the squares go to 16 float64 sums side by side: their order moves |b|^2 by far less than the 2^-20
       margin); each 16 channels give 8 pairs, stored to their lane of the panel */
    for (int64_t p = p0; p < p1; p++)
        for (int l = 0; l < VW; l++) {
            int64_t row = p * VW + l;
            uint32_t *out = panels + p * d2 * VW + l;
            if (row >= n) {
                for (int64_t kk = 0; kk < d2; kk++) out[kk * VW] = 0;
                pnorms[p * VW + l] = INFINITY;
                pgn[p * VW + l] = 0.0f;
                continue;
            }
            const float *src = g + row * d;
            __m512d sq0 = _mm512_setzero_pd(), sq1 = _mm512_setzero_pd();
            for (int64_t k = 0; k < 2 * d2; k += 16) {
                int64_t left = d - k;
                __mmask16 in = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                __m512 x = _mm512_maskz_loadu_ps(in, src + k);
                __m512d b0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)),
                                           _mm512_maskz_loadu_pd((__mmask8)in, mu + k));
                __m512d b1 = _mm512_sub_pd(
                    _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))),
                    _mm512_maskz_loadu_pd((__mmask8)(in >> 8), mu + k + 8));
                sq0 = _mm512_fmadd_pd(b0, b0, sq0);
                sq1 = _mm512_fmadd_pd(b1, b1, sq1);
                __m512 f = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(b0))),
                                                               _mm256_castps_pd(_mm512_cvtpd_ps(b1)), 1));
                __m512i u = _mm512_castps_si512(f);
                __m512i r = _mm512_srli_epi32(
                    _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
                    16);
                __m256i h = _mm512_cvtepi32_epi16(r);
                uint32_t pair[8];
                memcpy(pair, &h, 32);
                int64_t np = d2 - k / 2 < 8 ? d2 - k / 2 : 8;
                for (int64_t j = 0; j < np; j++) out[(k / 2 + j) * VW] = pair[j];
            }
            double sq = _mm512_reduce_add_pd(_mm512_add_pd(sq0, sq1));
            pnorms[p * VW + l] = (float)(sq * (1.0 - 0x1p-20) - t);
            pgn[p * VW + l] = (float)sqrt(sq);
        }
}

void sf_screen_bf16(int64_t r0, int64_t r1, const uint32_t *q, int64_t d2, const uint32_t *panels,
                    const float *pnorms, const float *pgn, const float *e, int64_t npan, int64_t base, int32_t m,
                    float *vals, int64_t *idx, float *ex) {
    int64_t chunk = (192 << 10) / (d2 * VW * 4);
    chunk = chunk / NP * NP;
    if (chunk < NP) chunk = NP;
    for (int64_t c0 = 0; c0 < npan; c0 += chunk) {
        int64_t c1 = c0 + chunk < npan ? c0 + chunk : npan;
        for (int64_t r = r0; r < r1; r += RB) {
            int nr = r1 - r < RB ? (int)(r1 - r) : RB;
            const uint32_t *qr[RB];
            for (int i = 0; i < RB; i++) qr[i] = q + (r + (i < nr ? i : nr - 1)) * d2;
            for (int64_t pn = c0; pn < c1; pn += NP) {
                __m512 acc[RB][NP];
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < NP; j++) acc[i][j] = _mm512_setzero_ps();
                const uint32_t *pa = panels + pn * d2 * VW;
                for (int64_t k = 0; k < d2; k++) {
                    __m512bh b[NP];
                    for (int j = 0; j < NP; j++) b[j] = (__m512bh)_mm512_loadu_si512(pa + (j * d2 + k) * VW);
                    for (int i = 0; i < RB; i++) {
                        __m512bh a = (__m512bh)_mm512_set1_epi32((int)qr[i][k]);
                        for (int j = 0; j < NP; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
                    }
                }
                for (int j = 0; j < NP; j++) {
                    vf nrm = ld(pnorms + (pn + j) * VW), gn = ld(pgn + (pn + j) * VW);
                    int64_t first = base + (pn + j) * VW;
                    for (int i = 0; i < nr; i++) {
                        int64_t row = r + i;
                        offer(nrm - 2.0f * (vf)acc[i][j] - e[row] * gn, first, vals + row * m, idx + row * m,
                              ex + row * m, m);
                    }
                }
            }
        }
    }
}
#else
int32_t sf_has_bf16(void) { return 0; }
#endif

/* Exact squared distances of the candidates from gallery rows [0, n) (indices base..) in the lists of
   query rows [r0, r1): differences and squares in float64 (exact for fp32 operands but for the last
   rounding of each square), rounded to fp32 once: the decision of runtime/scoring/base.py's merge.
   The squares go to 8 float64 sums side by side (one sequential sum waited on its adds' latency: most of
   this step's time at K = 5); the order of float64 additions moves the sum by far less than fp32's step. */
typedef double vd __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

static inline double exact_row(const float *a, const float *b, int64_t d) {
    vd s0 = {0}, s1 = {0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) {
        vf4 a0, a1, b0, b1;
        memcpy(&a0, a + k, 16);
        memcpy(&a1, a + k + 4, 16);
        memcpy(&b0, b + k, 16);
        memcpy(&b1, b + k + 4, 16);
        vd t0 = __builtin_convertvector(a0, vd) - __builtin_convertvector(b0, vd);
        vd t1 = __builtin_convertvector(a1, vd) - __builtin_convertvector(b1, vd);
        s0 += t0 * t0;
        s1 += t1 * t1;
    }
    vd s = s0 + s1;
    double acc = (s[0] + s[1]) + (s[2] + s[3]);
    for (; k < d; k++) {
        double t = (double)a[k] - (double)b[k];
        acc += t * t;
    }
    return acc;
}

void sf_exact(int64_t r0, int64_t r1, const float *q, int64_t d, const float *g, int64_t n, int64_t base, int32_t m,
              const int64_t *idx, float *ex) {
    for (int64_t r = r0; r < r1; r++)
        for (int32_t s = 0; s < m; s++) {
            int64_t id = idx[r * m + s] - base;
            if (id < 0 || id >= n) continue;
            ex[r * m + s] = (float)exact_row(q + r * d, g + id * d, d);
        }
}

#if defined(__AVX512VNNI__) && VW == 16
/* int8 screen (AVX512-VNNI VPDPBUSD): gallery rows as u8 = round(b / s_b) + 128 in panels of d4 channel
   quads by VW lanes, query rows as s8 = round(a / s_a) quads; acc - corr_i = sum a_q b_q exactly in
   int32. The caller's per-row parameters rp[4i..4i+3] = (2 s_a, C_i, s_a, e_i) and per-lane psb = s_b,
   pb1 = s_b |b_q|_1 make value = nb - s_b (2 s_a dot + C_i) - s_a pb1 - e_i gn a lower bound of the
   expanded distance (runtime/scoring/screens.py). */
int32_t sf_has_int8(void) { return 1; }

/* One pass over rows [0, n) of g (n x d): b = g - mu (float64), s_b = max|b| / 127 rounded up to fp32,
   b_q = rint(b / s_b); panels of u8 b_q + 128 (zero channels past d: 128, i.e. b_q = 0), and per lane
   pnorms = |b|^2 (1 - 2^-20) - t, pgn = |b|, psb = s_b, pb1 = s_b |b_q|_1 (+inf, 0 on padded lanes). */
void sf_prep_int8(const float *g, int64_t n, int64_t d, const double *mu, int64_t d4, int64_t p0, int64_t p1, double t,
                  uint32_t *panels, float *pnorms, float *pgn, float *psb, float *pb1) {
    uint8_t *bytes = (uint8_t *)panels;
    for (int64_t p = p0; p < p1; p++)
        for (int l = 0; l < VW; l++) {
            int64_t row = p * VW + l;
            double sq = 0.0, peak = 0.0;
            if (row < n)
                for (int64_t k = 0; k < d; k++) {
                    double b = (double)g[row * d + k] - mu[k];
                    sq += b * b;
                    peak = fabs(b) > peak ? fabs(b) : peak;
                }
            float s = (float)(peak / 127.0);
            if ((double)s * 127.0 < peak) s = nextafterf(s, INFINITY);
            double l1 = 0.0;
            for (int64_t k = 0; k < 4 * d4; k++) {
                int q = 0;
                if (row < n && k < d && s > 0.0f) {
                    q = (int)rint(((double)g[row * d + k] - mu[k]) / (double)s);
                    q = q > 127 ? 127 : (q < -127 ? -127 : q);
                    l1 += abs(q);
                }
                bytes[((p * d4 + k / 4) * VW + l) * 4 + (k & 3)] = (uint8_t)(q + 128);
            }
            pnorms[p * VW + l] = row < n ? (float)(sq * (1.0 - 0x1p-20) - t) : INFINITY;
            pgn[p * VW + l] = row < n ? (float)sqrt(sq) : 0.0f;
            psb[p * VW + l] = row < n ? s : 0.0f;
            pb1[p * VW + l] = row < n ? (float)(l1 * (double)s * (1.0 + 0x1p-20)) : 0.0f;
        }
}

void sf_screen_int8(int64_t r0, int64_t r1, const uint32_t *q, int64_t d4, const uint32_t *panels,
                    const float *pnorms, const float *pgn, const float *psb, const float *pb1, const float *rp,
                    const int32_t *corr, int64_t npan, int64_t base, int32_t m, float *vals, int64_t *idx,
                    float *ex) {
    int64_t chunk = (192 << 10) / (d4 * VW * 4);
    chunk = chunk / NP * NP;
    if (chunk < NP) chunk = NP;
    for (int64_t c0 = 0; c0 < npan; c0 += chunk) {
        int64_t c1 = c0 + chunk < npan ? c0 + chunk : npan;
        for (int64_t r = r0; r < r1; r += RB) {
            int nr = r1 - r < RB ? (int)(r1 - r) : RB;
            const uint32_t *qr[RB];
            for (int i = 0; i < RB; i++) qr[i] = q + (r + (i < nr ? i : nr - 1)) * d4;
            for (int64_t pn = c0; pn < c1; pn += NP) {
                __m512i acc[RB][NP];
                for (int i = 0; i < RB; i++)
                    for (int j = 0; j < NP; j++) acc[i][j] = _mm512_setzero_si512();
                const uint32_t *pa = panels + pn * d4 * VW;
                for (int64_t k = 0; k < d4; k++) {
                    __m512i b[NP];
                    for (int j = 0; j < NP; j++) b[j] = _mm512_loadu_si512(pa + (j * d4 + k) * VW);
                    for (int i = 0; i < RB; i++) {
                        __m512i a = _mm512_set1_epi32((int)qr[i][k]);
                        for (int j = 0; j < NP; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b[j], a);
                    }
                }
                for (int j = 0; j < NP; j++) {
                    int64_t o = (pn + j) * VW;
                    vf nrm = ld(pnorms + o), gn = ld(pgn + o), sb = ld(psb + o), b1 = ld(pb1 + o);
                    int64_t first = base + o;
                    for (int i = 0; i < nr; i++) {
                        int64_t row = r + i;
                        const float *c = rp + 4 * row;
                        __m512i dot = _mm512_sub_epi32(acc[i][j], _mm512_set1_epi32(corr[row]));
                        vf dotf = (vf)_mm512_cvtepi32_ps(dot);
                        vf v = nrm - sb * (c[0] * dotf + c[1]) - c[2] * b1 - c[3] * gn;
                        offer(v, first, vals + row * m, idx + row * m, ex + row * m, m);
                    }
                }
            }
        }
    }
}
#else
int32_t sf_has_int8(void) { return 0; }
#endif
