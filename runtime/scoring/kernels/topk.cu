// Exact top-kappa on the GPU: a tensor-core screen with a proven error bound, then exact fp64
// re-ranking of every candidate that may belong (runtime/scoring/cuda.py drives it; docs/speed.md).
//
// One source for every path that runs it: CuPy (RawModule, NVRTC), pycuda (SourceModule), nvcc (CI
// compiles it for sm_87, sm_90, sm_110) and g++ with tests/runtime/cuda_shim.h, which runs each block's
// threads as cooperative fibers that switch at __syncthreads (static __shared__ arrays are per block)
// and emulates nvcuda::wmma (m16n16k16, fp16 in, fp32 accumulation). Hence: one CUDA header, <mma.h>,
// for the compilers only; fp16 conversions written out (bit-exact with numpy's); no other warp intrinsics.
//
// Data, per search (all device memory):
//   blob     the gallery as stored: every level's (rows, C) array, fp32/fp16/int8, at byte offsets
//   scales   int8 levels' per-channel scales (fp32)
//   rows     per level, the first row of each gallery image (N + 1 entries; dense: i * h * w)
//   lv       per level, LV_FIELDS int64 descriptors (below)
//   taps     per coarse level, bilinear taps of the fine grid (y0, y1 per fine row, x0, x1 per fine col)
//   images   the K retrieved gallery images; colstart (K + 1): first gathered column of each
// A "column" is one row of the gathered fine level (pyramid: image slot k, fine cell r = c - k * M).
//
// The screen: S_l = fp16(Q_l) . fp16(G_l)^T with fp32 accumulation (cuBLAS GemmEx, outside this file),
// each coarse level at native resolution, interpolated here with the bilinear taps. Per pair the screen
// value a = |g|^2 - 2 sum_l <q_l, U g_l> is within e = E(image) * |q| + CG * |g|^2 of the true one (the
// bound's terms are derived in cuda.py; E(image) * |q| is (c_dot |q| + c_acc |q|_acc) R). A row keeps its n_keep smallest a (ties: lower column), and
// the smallest lower bound a - e among everything it dropped; it is settled when that exceeds the
// kappa-th smallest upper bound a + e among the kept. Kept candidates whose lower bound does not exceed
// it are re-computed exactly (fp64, from differences of the decoded values); unsettled rows are
// searched again exactly over every column.

// SPADE_NO_WMMA: compile without the fused kernel (NVRTC where no CUDA toolkit headers are found)
#if !defined(SPADE_NO_WMMA) && (defined(__CUDACC__) || defined(__CUDACC_RTC__))
#include <mma.h>
#endif

#define LV_FIELDS 16
#define LV_KIND 0       // 0: fine (at the query grid, or plain rows), 1: coarse (interpolated)
#define LV_H 1
#define LV_W 2
#define LV_C 3
#define LV_BYTE_OFF 4   // byte offset of the level's data in blob
#define LV_DTYPE 5      // 0 fp32, 1 fp16, 2 int8
#define LV_SCALE_OFF 6  // first scale in scales (int8), else -1
#define LV_Q_OFF 7      // first channel of the level in a query row (of D)
#define LV_S_OFF 8      // first element of the level's product S_l (columns x P, fp32)
#define LV_ROWS_OFF 9   // first entry of the level's image row starts in rows
#define LV_TAP_OFF 10   // first entry of the level's taps (coarse): y0[H] y1[H] x0[W] x1[W]
#define LV_G16_OFF 11   // first element of the level's gathered fp16 rows
#define LV_Q16_OFF 12   // first element of the level's fp16 query (P x C)
#define LV_QIN_OFF 13   // first element of the level's query map in the packed fp32 query
#define LV_NATIVE 14    // gathered rows of the level: fine: all columns; coarse: K * h * w
#define LV_BIG_H 15     // rows of the fine grid (coarse levels: the taps' y table length)

#define KEEP_MAX 96     // candidates a row may keep (kappa + spare)
#define FINISH_THREADS 32
#define RESCORE_THREADS 32
#define MAX_SPLITS 32

// ---------------------------------------------------------------------------- fp16, written out

__device__ __forceinline__ float half_to_float(unsigned short h)
{
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1Fu;
    unsigned int man = h & 0x3FFu;
    unsigned int bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int e = -1;
        do {
            man <<= 1;
            ++e;
        } while ((man & 0x400u) == 0);
        bits = sign | ((unsigned int)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    }
    union { unsigned int u; float f; } v;
    v.u = bits;
    return v.f;
}

// round to nearest even, as numpy's astype(float16) and __float2half_rn
__device__ __forceinline__ unsigned short float_to_half(float f)
{
    union { float f; unsigned int u; } v;
    v.f = f;
    unsigned int x = v.u;
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u)  // inf or NaN
        return (unsigned short)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
    if (ax >= 0x477FF000u)  // rounds to >= 65520: overflow to inf
        return (unsigned short)(sign | 0x7C00u);
    if (ax < 0x33000001u)  // below half the smallest subnormal (2^-25): zero (2^-25 itself ties to even 0)
        return (unsigned short)sign;
    unsigned int e = ax >> 23;
    unsigned int m = (ax & 0x7FFFFFu) | 0x800000u;
    unsigned int shift, h;
    if (e < 113) {  // subnormal half
        shift = 126 - e;  // 14 + (113 - e) - 1 ... bits dropped from the 24-bit significand
        h = m >> shift;
        unsigned int rest = m & ((1u << shift) - 1u);
        unsigned int halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
        return (unsigned short)(sign | h);
    }
    h = ((e - 112u) << 10) | ((m >> 13) & 0x3FFu);
    unsigned int rest = m & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
    return (unsigned short)(sign | h);
}

// ---------------------------------------------------------------------------- reading the gallery

// element (row, ch) of level l as its decoded fp32 value (the CPU's codec.decode: int8 * scale)
__device__ __forceinline__ float load_g(const unsigned char* __restrict__ blob, const float* __restrict__ scales,
                                        const long long* __restrict__ d, long long row, long long ch)
{
    const long long at = row * d[LV_C] + ch;
    const unsigned char* base = blob + d[LV_BYTE_OFF];
    const long long dtype = d[LV_DTYPE];
    if (dtype == 0) return ((const float*)base)[at];
    if (dtype == 1) return half_to_float(((const unsigned short*)base)[at]);
    return (float)((const signed char*)base)[at] * scales[d[LV_SCALE_OFF] + ch];
}

// The bilinear taps of fine cell r on a coarse level (descriptor d): its four native cells (row-major,
// from the image's first row) and their weights, in fp64.
struct Taps {
    long long c00, c10, c01, c11;
    double wy0, wy1, wx0, wx1;
};

__device__ __forceinline__ Taps taps_of(const long long* __restrict__ d, const long long* __restrict__ taps,
                                        const float* __restrict__ tapw, long long r, long long big_w)
{
    const long long y = r / big_w, x = r % big_w, w = d[LV_W], big_h = d[LV_BIG_H];
    const long long* t = taps + d[LV_TAP_OFF];
    const float* tw = tapw + d[LV_TAP_OFF];
    const long long y0 = t[y], y1 = t[big_h + y], x0 = t[2 * big_h + x], x1 = t[2 * big_h + big_w + x];
    Taps k;
    k.c00 = y0 * w + x0;
    k.c10 = y1 * w + x0;
    k.c01 = y0 * w + x1;
    k.c11 = y1 * w + x1;
    k.wy0 = tw[y];
    k.wy1 = tw[big_h + y];
    k.wx0 = tw[2 * big_h + x];
    k.wx1 = tw[2 * big_h + big_w + x];
    return k;
}

// the interpolated value from the four taps' values, rows first, then columns (the CPU reference's order)
__device__ __forceinline__ double blend(const Taps& k, double g00, double g10, double g01, double g11)
{
    return k.wx0 * (k.wy0 * g00 + k.wy1 * g10) + k.wx1 * (k.wy0 * g01 + k.wy1 * g11);
}

// the slot k of column c: colstart[k] <= c < colstart[k + 1]
__device__ __forceinline__ int slot_of(const long long* __restrict__ colstart, int k_count, long long c)
{
    int lo = 0, hi = k_count;  // invariant: colstart[lo] <= c < colstart[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (colstart[mid] <= c) lo = mid; else hi = mid;
    }
    return lo;
}

// Part of the exact squared distance between query row p (fp64, P x D) and column c: the channels
// ch = first, first + step, ... of every level. Coarse levels are interpolated in fp64 from the
// decoded values, in the order of the CPU reference (rows first, then columns).
__device__ double exact_part(const double* __restrict__ q64, long long d_total, long long p,
                             const unsigned char* __restrict__ blob, const float* __restrict__ scales,
                             const long long* __restrict__ rows, const long long* __restrict__ lv, int n_levels,
                             const long long* __restrict__ taps, const float* __restrict__ tapw,
                             const long long* __restrict__ images, const long long* __restrict__ colstart,
                             int k_count, long long c, long long big_w, int first, int step)
{
    const int k = slot_of(colstart, k_count, c);
    const long long img = images[k];
    const long long r = c - colstart[k];
    const double* qrow = q64 + p * d_total;
    double sum = 0.0;
    for (int l = 0; l < n_levels; ++l) {
        const long long* d = lv + (long long)l * LV_FIELDS;
        const long long ch_n = d[LV_C];
        const long long row0 = rows[d[LV_ROWS_OFF] + img];
        const double* ql = qrow + d[LV_Q_OFF];
        if (d[LV_KIND] == 0) {
            for (long long ch = first; ch < ch_n; ch += step) {
                const double diff = ql[ch] - (double)load_g(blob, scales, d, row0 + r, ch);
                sum += diff * diff;
            }
            continue;
        }
        const Taps k = taps_of(d, taps, tapw, r, big_w);
        for (long long ch = first; ch < ch_n; ch += step) {
            const double g = blend(k, load_g(blob, scales, d, row0 + k.c00, ch), load_g(blob, scales, d, row0 + k.c10, ch),
                                   load_g(blob, scales, d, row0 + k.c01, ch), load_g(blob, scales, d, row0 + k.c11, ch));
            const double diff = ql[ch] - g;
            sum += diff * diff;
        }
    }
    return sum;
}

// ---------------------------------------------------------------------------- the query

// Query rows at the fine grid in fp64 (coarse levels interpolated as exact_part interpolates the
// gallery), their fp16 copies per level for the screen's products, |q| at qnorm[p] and the
// accumulation term sqrt(sum_l gamma_l^2 |q_l|^2) at qnorm[P + p], gamma_l = C_l u / (1 - C_l u) with
// u = u_acc (both upper bounds, fp32; cuda.py's screen_bound). One thread per query row.
extern "C" __global__ void prepare_query(const float* __restrict__ qin, const long long* __restrict__ lv,
                                         int n_levels, const long long* __restrict__ taps,
                                         const float* __restrict__ tapw, long long n_query, long long big_w,
                                         long long d_total, double u_acc, double* __restrict__ q64,
                                         unsigned short* __restrict__ q16, float* __restrict__ qnorm)
{
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_query) return;
    double sq = 0.0, acc = 0.0;
    for (int l = 0; l < n_levels; ++l) {
        double lsq = 0.0;  // |q_l|^2
        const long long* d = lv + (long long)l * LV_FIELDS;
        const long long ch_n = d[LV_C];
        const float* src = qin + d[LV_QIN_OFF];
        double* out = q64 + p * d_total + d[LV_Q_OFF];
        unsigned short* out16 = q16 + d[LV_Q16_OFF] + p * ch_n;
        if (d[LV_KIND] == 0) {
            for (long long ch = 0; ch < ch_n; ++ch) {
                const double v = src[p * ch_n + ch];
                out[ch] = v;
                out16[ch] = float_to_half((float)v);
                lsq += v * v;
            }
            const double gamma = (double)ch_n * u_acc / (1.0 - (double)ch_n * u_acc);
            sq += lsq;
            acc += gamma * gamma * lsq;
            continue;
        }
        const Taps k = taps_of(d, taps, tapw, p, big_w);
        for (long long ch = 0; ch < ch_n; ++ch) {
            const double v = blend(k, src[k.c00 * ch_n + ch], src[k.c10 * ch_n + ch], src[k.c01 * ch_n + ch],
                                   src[k.c11 * ch_n + ch]);
            out[ch] = v;
            out16[ch] = float_to_half((float)v);
            lsq += v * v;
        }
        const double gamma = (double)ch_n * u_acc / (1.0 - (double)ch_n * u_acc);
        sq += lsq;
        acc += gamma * gamma * lsq;
    }
    // sqrt in fp64 then up by a relative 2^-20: from above, whatever the rounding
    qnorm[p] = (float)(sqrt(sq) * (1.0 + 1.0 / 1048576.0));
    qnorm[n_query + p] = (float)(sqrt(acc) * (1.0 + 1.0 / 1048576.0));
}

// ---------------------------------------------------------------------------- the gallery

// fp16 rows of the retrieved images for the screen's products, every level in one launch
// (grid.y = level): fine levels column by column, coarse levels image by image at native size.
extern "C" __global__ void gather_fp16(const unsigned char* __restrict__ blob, const float* __restrict__ scales,
                                       const long long* __restrict__ rows, const long long* __restrict__ lv,
                                       const long long* __restrict__ images, const long long* __restrict__ colstart,
                                       int k_count, unsigned short* __restrict__ g16)
{
    const long long* d = lv + (long long)blockIdx.y * LV_FIELDS;
    const long long ch_n = d[LV_C];
    const long long total = d[LV_NATIVE] * ch_n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / ch_n, ch = i % ch_n;
        long long src_row;
        if (d[LV_KIND] == 0) {
            const long long c = colstart[0] + row;  // this launch's images start at column colstart[0]
            const int k = slot_of(colstart, k_count, c);
            src_row = rows[d[LV_ROWS_OFF] + images[k]] + (c - colstart[k]);
        } else {
            const long long cells = d[LV_H] * d[LV_W];
            src_row = rows[d[LV_ROWS_OFF] + images[row / cells]] + row % cells;
        }
        g16[d[LV_G16_OFF] + i] = float_to_half(load_g(blob, scales, d, src_row, ch));
    }
}

// |U g|^2 of every gallery column of the whole gallery (fp64, kept as fp32) for the screen, one
// thread per column; column c of image i at rows[i] + r of the fine level (dense: i * M + r).
extern "C" __global__ void gallery_sqnorms(const unsigned char* __restrict__ blob, const float* __restrict__ scales,
                                           const long long* __restrict__ rows, const long long* __restrict__ lv,
                                           int n_levels, const long long* __restrict__ taps,
                                           const float* __restrict__ tapw, long long n_images, long long big_w,
                                           float* __restrict__ gn)
{
    const long long total = rows[lv[LV_ROWS_OFF] + n_images];  // rows of the fine level
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= total) return;
    // the image of this row: binary search over the fine level's row starts
    long long lo = 0, hi = n_images;
    const long long* starts = rows + lv[LV_ROWS_OFF];
    while (hi - lo > 1) {
        long long mid = (lo + hi) >> 1;
        if (starts[mid] <= col) lo = mid; else hi = mid;
    }
    const long long r = col - starts[lo];
    double sum = 0.0;
    for (int l = 0; l < n_levels; ++l) {
        const long long* d = lv + (long long)l * LV_FIELDS;
        const long long ch_n = d[LV_C];
        const long long row0 = rows[d[LV_ROWS_OFF] + lo];
        if (d[LV_KIND] == 0) {
            for (long long ch = 0; ch < ch_n; ++ch) {
                const double v = load_g(blob, scales, d, row0 + r, ch);
                sum += v * v;
            }
            continue;
        }
        const Taps k = taps_of(d, taps, tapw, r, big_w);
        for (long long ch = 0; ch < ch_n; ++ch) {
            const double v = blend(k, load_g(blob, scales, d, row0 + k.c00, ch), load_g(blob, scales, d, row0 + k.c10, ch),
                                   load_g(blob, scales, d, row0 + k.c01, ch), load_g(blob, scales, d, row0 + k.c11, ch));
            sum += v * v;
        }
    }
    gn[col] = (float)sum;
}

// Per gallery image, R = sqrt(sum over levels of (max stored-cell norm)^2): bounds |g_l| of every
// row or tap the screen reads (interpolation is a convex combination). One block per image, a
// shared-memory max-reduction per level.
#define REACH_THREADS 128
extern "C" __global__ void gallery_reach(const unsigned char* __restrict__ blob, const float* __restrict__ scales,
                                         const long long* __restrict__ rows, const long long* __restrict__ lv,
                                         int n_levels, float* __restrict__ reach)
{
    __shared__ double best[REACH_THREADS];
    const long long img = blockIdx.x;
    double total = 0.0;
    for (int l = 0; l < n_levels; ++l) {
        const long long* d = lv + (long long)l * LV_FIELDS;
        const long long first = rows[d[LV_ROWS_OFF] + img], end = rows[d[LV_ROWS_OFF] + img + 1];
        double mine = 0.0;
        for (long long row = first + threadIdx.x; row < end; row += blockDim.x) {
            double sq = 0.0;
            for (long long ch = 0; ch < d[LV_C]; ++ch) {
                const double v = load_g(blob, scales, d, row, ch);
                sq += v * v;
            }
            mine = sq > mine ? sq : mine;
        }
        best[threadIdx.x] = mine;
        __syncthreads();
        for (unsigned int half = blockDim.x / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half && best[threadIdx.x + half] > best[threadIdx.x])
                best[threadIdx.x] = best[threadIdx.x + half];
            __syncthreads();
        }
        total += best[0];
        __syncthreads();  // best[0] read by all before the next level overwrites it
    }
    if (threadIdx.x == 0) reach[img] = (float)(sqrt(total) * (1.0 + 1.0 / 1048576.0));
}

// ---------------------------------------------------------------------------- the screen

// A row's candidate list: its n_keep smallest screen values a (ties: the column seen first, i.e. the
// lower one), their bounds e and columns, and the smallest lower bound a - e among the dropped.
__device__ __forceinline__ void keep_candidate(float a, float e, long long c, float* la, float* le, long long* lc,
                                               int& count, float& drop, int n_keep)
{
    if (!(a - a == 0.0f) || !(e - e == 0.0f)) {  // inf or NaN (fp16 overflow): nothing is proven for this row
        drop = -3.0e38f;
        return;
    }
    if (count == n_keep && !(a < la[n_keep - 1])) {  // equal: the lower column, already kept, stays first
        const float lb = a - e;
        drop = lb < drop ? lb : drop;
        return;
    }
    int j;
    if (count < n_keep) {
        j = count++;
    } else {
        const float lb = la[n_keep - 1] - le[n_keep - 1];
        drop = lb < drop ? lb : drop;
        j = n_keep - 1;
    }
    while (j > 0 && la[j - 1] > a) {
        la[j] = la[j - 1];
        le[j] = le[j - 1];
        lc[j] = lc[j - 1];
        --j;
    }
    la[j] = a;
    le[j] = e;
    lc[j] = c;
}

// The screen's <q, U g> at query row p and column c (slot k, fine cell r) over levels l0.. of the
// products through memory: a fine level's product at the column ((column, P)-major), a coarse level's
// four taps interpolated (coalesced: at each column the threads of a warp read neighbouring rows).
__device__ __forceinline__ float product_dot(const float* __restrict__ prods, const long long* __restrict__ lv,
                                             int l0, int n_levels, const long long* __restrict__ taps,
                                             const float* __restrict__ tapw, long long c_rel, int k, long long r,
                                             long long n_query, long long big_w, long long p)
{
    float dot = 0.0f;
    for (int l = l0; l < n_levels; ++l) {
        const long long* d = lv + (long long)l * LV_FIELDS;
        if (d[LV_KIND] == 0) {
            dot += prods[d[LV_S_OFF] + c_rel * n_query + p];
            continue;
        }
        const long long y = r / big_w, x = r % big_w, w = d[LV_W];
        const long long* t = taps + d[LV_TAP_OFF];
        const float* tw = tapw + d[LV_TAP_OFF];
        const long long big_h = d[LV_BIG_H];
        const long long base = (long long)k * d[LV_H] * w;
        const float* s = prods + d[LV_S_OFF];
        const long long y0 = t[y], y1 = t[big_h + y], x0 = t[2 * big_h + x], x1 = t[2 * big_h + big_w + x];
        const float wy0 = tw[y], wy1 = tw[big_h + y], wx0 = tw[2 * big_h + x], wx1 = tw[2 * big_h + big_w + x];
        dot += wx0 * (wy0 * s[(base + y0 * w + x0) * n_query + p] + wy1 * s[(base + y1 * w + x0) * n_query + p]) +
               wx1 * (wy0 * s[(base + y0 * w + x1) * n_query + p] + wy1 * s[(base + y1 * w + x1) * n_query + p]);
    }
    return dot;
}

__device__ __forceinline__ void write_candidates(const float* la, const float* le, const long long* lc, int count,
                                                 float drop, int n_keep, long long split, long long n_query,
                                                 long long p, float* __restrict__ out_a, float* __restrict__ out_e,
                                                 long long* __restrict__ out_c, float* __restrict__ out_drop)
{
    for (int i = 0; i < n_keep; ++i) {
        const long long at = (split * n_keep + i) * n_query + p;
        out_a[at] = i < count ? la[i] : 3.0e38f;
        out_e[at] = i < count ? le[i] : 0.0f;
        out_c[at] = i < count ? lc[i] : -1;
    }
    out_drop[split * n_query + p] = drop;
}

// grid (ceil(P / blockDim), splits): thread p of split s scans columns [s * span, (s + 1) * span) of
// the gathered gallery, reading every level's product from memory, and keeps its n_keep smallest
// screen values in registers/local memory. Writes them, (s, i, p)-major, and the smallest lower bound
// among the columns it dropped.
extern "C" __global__ void screen_select(const float* __restrict__ prods, const long long* __restrict__ lv,
                                         int n_levels, const long long* __restrict__ taps,
                                         const float* __restrict__ tapw, const long long* __restrict__ rows,
                                         const long long* __restrict__ images,
                                         const long long* __restrict__ colstart, int k_count,
                                         const float* __restrict__ gn, const float* __restrict__ reach,
                                         const float* __restrict__ qnorm, float c_dot, float c_acc, float c_sub,
                                         float c_norm,
                                         long long n_query, long long big_w, long long span, int n_keep,
                                         long long split_base, float* __restrict__ out_a, float* __restrict__ out_e,
                                         long long* __restrict__ out_c, float* __restrict__ out_drop)
{
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_query) return;
    // this launch's images (a chunk of the retrieved ones) start at column colstart[0]; its products
    // hold their columns from there, and its lists go after those of earlier chunks (split_base)
    const long long split = split_base + blockIdx.y;
    const long long c_first = colstart[0];
    const long long c_end_all = colstart[k_count];
    const long long c0 = c_first + (long long)blockIdx.y * span;
    const long long c1 = c0 + span < c_end_all ? c0 + span : c_end_all;

    float la[KEEP_MAX], le[KEEP_MAX];
    long long lc[KEEP_MAX];
    int count = 0;
    float drop = 3.0e38f;  // smallest a - e among dropped columns (+ "infinity" when none)
    const float qn = qnorm[p], qa = qnorm[n_query + p];

    int k = c0 < c1 ? slot_of(colstart, k_count, c0) : 0;
    long long k_end = colstart[k + 1];
    long long img = images[k];
    long long gbase = rows[lv[LV_ROWS_OFF] + img];
    float e_img = (c_dot * qn + c_acc * qa) * reach[img] + c_sub * (qn + reach[img] + 1.0f);

    for (long long c = c0; c < c1; ++c) {
        while (c >= k_end) {  // the next retrieved image
            ++k;
            k_end = colstart[k + 1];
            img = images[k];
            gbase = rows[lv[LV_ROWS_OFF] + img];
            e_img = (c_dot * qn + c_acc * qa) * reach[img] + c_sub * (qn + reach[img] + 1.0f);
        }
        const long long r = c - colstart[k];
        const float dot = product_dot(prods, lv, 0, n_levels, taps, tapw, c - c_first, k, r, n_query, big_w, p);
        const float g2 = gn[gbase + r];
        keep_candidate(g2 - 2.0f * dot, e_img + c_norm * g2, c, la, le, lc, count, drop, n_keep);
    }
    write_candidates(la, le, lc, count, drop, n_keep, split, n_query, p, out_a, out_e, out_c, out_drop);
}

// ---------------------------------------------------------------------------- the fused screen

// The fine level's product and the selection in one kernel: the product never goes to memory.
// grid (ceil(P / FT_ROWS), splits), FT_THREADS threads. A block takes FT_ROWS query rows and walks
// its split's columns FT_COLS at a time; per column tile, the fp16 query rows and gallery columns go
// through shared memory FT_K channels at a time (zero-padded past C, P and the split's end), each
// warp multiplies its 32 rows by the tile's 64 columns on the tensor cores (2 x 4 wmma m16n16k16
// fragments, fp32 accumulation) and stores them into shared memory column-major; then thread t,
// owner of query row p0 + t, adds the other levels' products (through memory, as screen_select) and
// keeps its candidates as screen_select does, reading the tile without bank conflicts. Level 0 of lv
// is the fused one: its fp16 query at q16 + LV_Q16_OFF (P x C), its gathered rows at g16 + LV_G16_OFF.
#define FT_ROWS 64
#define FT_COLS 64
#define FT_K 32
#define FT_THREADS 64

#ifndef SPADE_NO_WMMA
struct __align__(16) Half8 {  // eight fp16 values, one 16-byte load
    unsigned int w[4];
};

extern "C" __global__ void __launch_bounds__(FT_THREADS)
    fused_select(const unsigned short* __restrict__ q16, const unsigned short* __restrict__ g16,
                 const float* __restrict__ prods, const long long* __restrict__ lv, int n_levels,
                 const long long* __restrict__ taps, const float* __restrict__ tapw,
                 const long long* __restrict__ rows, const long long* __restrict__ images,
                 const long long* __restrict__ colstart, int k_count, const float* __restrict__ gn,
                 const float* __restrict__ reach, const float* __restrict__ qnorm, float c_dot, float c_acc,
                 float c_sub, float c_norm, long long n_query, long long big_w, long long span, int n_keep, long long split_base,
                 float* __restrict__ out_a, float* __restrict__ out_e, long long* __restrict__ out_c,
                 float* __restrict__ out_drop)
{
    using namespace nvcuda;
    __shared__ __align__(32) unsigned short qs[FT_ROWS * FT_K];  // A: row-major, FT_K channels a row
    __shared__ __align__(32) unsigned short gs[FT_COLS * FT_K];  // B = G^T: column-major (a column's channels)
    __shared__ __align__(32) float st[FT_COLS * FT_ROWS];        // the tile's products, column-major

    const int t = threadIdx.x, warp = t / 32;
    const long long p0 = (long long)blockIdx.x * FT_ROWS, p = p0 + t;
    const bool live = p < n_query;
    const long long split = split_base + blockIdx.y;
    const long long c_first = colstart[0];
    const long long c_end_all = colstart[k_count];
    const long long c0 = c_first + (long long)blockIdx.y * span;
    const long long c1 = c0 + span < c_end_all ? c0 + span : c_end_all;
    const long long ch_n = lv[LV_C];
    const unsigned short* __restrict__ qb = q16 + lv[LV_Q16_OFF];
    const unsigned short* __restrict__ gb = g16 + lv[LV_G16_OFF];
    // 16-byte loads where every row starts 16-byte aligned (the buffers are 256-byte aligned)
    const bool vec = (ch_n & 7) == 0 && (lv[LV_Q16_OFF] & 7) == 0 && (lv[LV_G16_OFF] & 7) == 0;

    float la[KEEP_MAX], le[KEEP_MAX];
    long long lc[KEEP_MAX];
    int count = 0;
    float drop = 3.0e38f;
    const float qn = live ? qnorm[p] : 0.0f, qa = live ? qnorm[n_query + p] : 0.0f;
    int k = c0 < c1 ? slot_of(colstart, k_count, c0) : 0;
    long long k_end = colstart[k + 1];
    long long img = images[k];
    long long gbase = rows[lv[LV_ROWS_OFF] + img];
    float e_img = (c_dot * qn + c_acc * qa) * reach[img] + c_sub * (qn + reach[img] + 1.0f);

    for (long long ct = c0; ct < c1; ct += FT_COLS) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
        for (long long k0 = 0; k0 < ch_n; k0 += FT_K) {
            if (vec) {  // 8 halves (16 bytes) a load: C a multiple of 8, so a vector is all in or all out
#pragma unroll 1
                for (int i = t; i < FT_ROWS * FT_K / 8; i += FT_THREADS) {
                    const long long row = p0 + i / (FT_K / 8), ch = k0 + i % (FT_K / 8) * 8;
                    reinterpret_cast<Half8*>(qs)[i] =
                        row < n_query && ch < ch_n ? *reinterpret_cast<const Half8*>(qb + row * ch_n + ch) : Half8{};
                }
#pragma unroll 1
                for (int i = t; i < FT_COLS * FT_K / 8; i += FT_THREADS) {
                    const long long c = ct + i / (FT_K / 8), ch = k0 + i % (FT_K / 8) * 8;
                    reinterpret_cast<Half8*>(gs)[i] =
                        c < c1 && ch < ch_n ? *reinterpret_cast<const Half8*>(gb + (c - c_first) * ch_n + ch) : Half8{};
                }
            } else {
                for (int i = t; i < FT_ROWS * FT_K; i += FT_THREADS) {
                    const long long row = p0 + i / FT_K, ch = k0 + i % FT_K;
                    qs[i] = row < n_query && ch < ch_n ? qb[row * ch_n + ch] : (unsigned short)0;
                }
                for (int i = t; i < FT_COLS * FT_K; i += FT_THREADS) {
                    const long long c = ct + i / FT_K, ch = k0 + i % FT_K;
                    gs[i] = c < c1 && ch < ch_n ? gb[(c - c_first) * ch_n + ch] : (unsigned short)0;
                }
            }
            __syncthreads();
            for (int kk = 0; kk < FT_K; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
                for (int i = 0; i < 2; ++i)
                    wmma::load_matrix_sync(a[i], reinterpret_cast<const __half*>(qs + (warp * 32 + i * 16) * FT_K + kk),
                                           FT_K);
                for (int j = 0; j < 4; ++j) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
                    wmma::load_matrix_sync(b, reinterpret_cast<const __half*>(gs + j * 16 * FT_K + kk), FT_K);
                    for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
                }
            }
            __syncthreads();  // the staged tiles are read by every warp before the next ones overwrite them
        }
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 4; ++j)
                wmma::store_matrix_sync(st + j * 16 * FT_ROWS + warp * 32 + i * 16, acc[i][j], FT_ROWS,
                                        wmma::mem_col_major);
        __syncthreads();
        if (live) {
            const int n_here = c1 - ct < FT_COLS ? (int)(c1 - ct) : FT_COLS;
            for (int jj = 0; jj < n_here; ++jj) {
                const long long c = ct + jj;
                while (c >= k_end) {  // the next retrieved image
                    ++k;
                    k_end = colstart[k + 1];
                    img = images[k];
                    gbase = rows[lv[LV_ROWS_OFF] + img];
                    e_img = (c_dot * qn + c_acc * qa) * reach[img] + c_sub * (qn + reach[img] + 1.0f);
                }
                const long long r = c - colstart[k];
                const float dot = st[jj * FT_ROWS + t] +
                                  product_dot(prods, lv, 1, n_levels, taps, tapw, c - c_first, k, r, n_query, big_w, p);
                const float g2 = gn[gbase + r];
                keep_candidate(g2 - 2.0f * dot, e_img + c_norm * g2, c, la, le, lc, count, drop, n_keep);
            }
        }
        __syncthreads();  // the tile is read by every thread before the next one is stored
    }
    if (live) write_candidates(la, le, lc, count, drop, n_keep, split, n_query, p, out_a, out_e, out_c, out_drop);
}
#endif  // SPADE_NO_WMMA

// ---------------------------------------------------------------------------- the decision

// One block per query row: merge the splits' lists (thread 0), settle the row, re-compute exactly
// the kept candidates that may belong (all threads, channels split among them), keep the kappa
// smallest exact distances, ties to the lower column. A row that cannot be settled is appended to
// `unsettled` (its result is then written by rescore_select).
extern "C" __global__ void finish_rows(const float* __restrict__ cand_a, const float* __restrict__ cand_e,
                                       const long long* __restrict__ cand_c, const float* __restrict__ cand_drop,
                                       int splits, int n_keep, int kappa, long long n_query,
                                       const double* __restrict__ q64, long long d_total,
                                       const unsigned char* __restrict__ blob, const float* __restrict__ scales,
                                       const long long* __restrict__ rows, const long long* __restrict__ lv,
                                       int n_levels, const long long* __restrict__ taps,
                                       const float* __restrict__ tapw, const long long* __restrict__ images,
                                       const long long* __restrict__ colstart, int k_count, long long big_w,
                                       float* __restrict__ out_d, long long* __restrict__ out_i,
                                       int* __restrict__ unsettled, long long* __restrict__ unsettled_rows,
                                       int* __restrict__ exact_count)
{
    __shared__ float sa[KEEP_MAX], se[KEEP_MAX];
    __shared__ long long sc[KEEP_MAX];
    __shared__ int may[KEEP_MAX];
    __shared__ double partial[FINISH_THREADS][KEEP_MAX];
    __shared__ double ex[KEEP_MAX];
    __shared__ int count;
    const long long p = blockIdx.x;
    const int t = threadIdx.x;

    if (t == 0) {
        // merge: each split's list is sorted by (a, column); splits hold increasing column ranges,
        // so inserting split after split with "strictly smaller enters" keeps ties to the lower column
        float drop = 3.0e38f;
        int n = 0;
        for (int s = 0; s < splits; ++s) {
            const float d = cand_drop[s * n_query + p];
            drop = d < drop ? d : drop;
            for (int i = 0; i < n_keep; ++i) {
                const long long at = ((long long)s * n_keep + i) * n_query + p;
                const long long c = cand_c[at];
                if (c < 0) break;
                keep_candidate(cand_a[at], cand_e[at], c, sa, se, sc, n, drop, n_keep);  // finite: kept by a split
            }
        }
        count = n;
        // T: the kappa-th smallest upper bound among the kept, in fp64 and rounded outward
        double ub[KEEP_MAX];
        for (int i = 0; i < KEEP_MAX; ++i) ub[i] = i < n ? (double)sa[i] + (double)se[i] : 3.0e38;
        for (int i = 1; i < n; ++i) {  // insertion sort: n <= KEEP_MAX, once per row
            double v = ub[i];
            int j = i;
            while (j > 0 && ub[j - 1] > v) {
                ub[j] = ub[j - 1];
                --j;
            }
            ub[j] = v;
        }
        const double limit = n >= kappa ? ub[kappa - 1] : 3.0e38;
        // the fp32 subtractions that made the dropped lower bounds: off by at most 2^-24 relative
        const double d64 = (double)drop;
        const double drop_lb = d64 - (d64 < 0 ? -d64 : d64) * (1.0 / 8388608.0) - 1e-30;
        int settled = n >= kappa && drop_lb > limit;
        for (int i = 0; i < n; ++i) may[i] = ((double)sa[i] - (double)se[i]) <= limit;
        for (int i = n; i < KEEP_MAX; ++i) may[i] = 0;
        if (!settled) {
            const int at = atomicAdd(unsettled, 1);
            unsettled_rows[at] = p;
        }
    }
    __syncthreads();
    const int n = count;
    for (int i = 0; i < n; ++i)
        partial[t][i] = may[i] ? exact_part(q64, d_total, p, blob, scales, rows, lv, n_levels, taps, tapw, images,
                                            colstart, k_count, sc[i], big_w, t, FINISH_THREADS)
                               : 0.0;
    __syncthreads();
    for (int i = t; i < n; i += FINISH_THREADS) {
        double s = 0.0;
        for (int u = 0; u < FINISH_THREADS; ++u) s += partial[u][i];
        ex[i] = may[i] ? s : 1e300;
    }
    __syncthreads();
    if (t == 0) {
        int done = 0;
        for (int i = 0; i < n; ++i) done += may[i];
        atomicAdd(exact_count, done);
        // the kappa smallest (exact, column), by selection: kappa passes over n <= KEEP_MAX
        for (int j = 0; j < kappa; ++j) {
            int best = -1;
            for (int i = 0; i < n; ++i) {
                if (!may[i]) continue;
                if (best < 0 || ex[i] < ex[best] || (ex[i] == ex[best] && sc[i] < sc[best])) best = i;
            }
            if (best < 0) {
                out_d[p * kappa + j] = 3.0e38f;
                out_i[p * kappa + j] = -1;
                continue;
            }
            out_d[p * kappa + j] = (float)ex[best];
            out_i[p * kappa + j] = sc[best];
            may[best] = 0;
        }
    }
}

// ---------------------------------------------------------------------------- rows searched again

// Exact distances of the unsettled rows to every column: grid (ceil(columns / blockDim), rows).
extern "C" __global__ void rescore_distances(const long long* __restrict__ unsettled_rows, long long n_cols,
                                             const double* __restrict__ q64, long long d_total,
                                             const unsigned char* __restrict__ blob,
                                             const float* __restrict__ scales, const long long* __restrict__ rows,
                                             const long long* __restrict__ lv, int n_levels,
                                             const long long* __restrict__ taps, const float* __restrict__ tapw,
                                             const long long* __restrict__ images,
                                             const long long* __restrict__ colstart, int k_count, long long big_w,
                                             double* __restrict__ dist)
{
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n_cols) return;
    const long long p = unsettled_rows[blockIdx.y];
    dist[(long long)blockIdx.y * n_cols + c] =
        exact_part(q64, d_total, p, blob, scales, rows, lv, n_levels, taps, tapw, images, colstart, k_count, c, big_w,
                   0, 1);
}

// The kappa smallest of each unsettled row's exact distances, ties to the lower column: one block a
// row, each thread a strided share of the columns, then thread 0 merges the threads' lists.
extern "C" __global__ void rescore_select(const long long* __restrict__ unsettled_rows, long long n_cols,
                                          const double* __restrict__ dist, int kappa, double* __restrict__ scratch_d,
                                          long long* __restrict__ scratch_c, float* __restrict__ out_d,
                                          long long* __restrict__ out_i)
{
    const long long row = blockIdx.x;
    const long long p = unsettled_rows[row];
    const int t = threadIdx.x;
    const double* dr = dist + row * n_cols;
    double* md = scratch_d + (row * RESCORE_THREADS + t) * kappa;
    long long* mc = scratch_c + (row * RESCORE_THREADS + t) * kappa;
    int n = 0;
    for (long long c = t; c < n_cols; c += RESCORE_THREADS) {
        const double v = dr[c];
        if (n == kappa && !(v < md[kappa - 1])) continue;
        int j = n < kappa ? n++ : kappa - 1;
        while (j > 0 && md[j - 1] > v) {
            md[j] = md[j - 1];
            mc[j] = mc[j - 1];
            --j;
        }
        md[j] = v;
        mc[j] = c;
    }
    for (int j = n; j < kappa; ++j) {
        md[j] = 1e300;
        mc[j] = -1;
    }
    __syncthreads();
    if (t != 0) return;
    int head[RESCORE_THREADS];
    for (int u = 0; u < RESCORE_THREADS; ++u) head[u] = 0;
    const double* all_d = scratch_d + row * RESCORE_THREADS * kappa;
    const long long* all_c = scratch_c + row * RESCORE_THREADS * kappa;
    for (int j = 0; j < kappa; ++j) {
        int best = -1;
        for (int u = 0; u < RESCORE_THREADS; ++u) {
            if (head[u] >= kappa) continue;
            const long long c = all_c[u * kappa + head[u]];
            if (c < 0) continue;
            const double v = all_d[u * kappa + head[u]];
            if (best < 0) {
                best = u;
                continue;
            }
            const double bv = all_d[best * kappa + head[best]];
            if (v < bv || (v == bv && c < all_c[best * kappa + head[best]])) best = u;
        }
        if (best < 0) {
            out_d[p * kappa + j] = 3.0e38f;
            out_i[p * kappa + j] = -1;
            continue;
        }
        out_d[p * kappa + j] = (float)all_d[best * kappa + head[best]];
        out_i[p * kappa + j] = all_c[best * kappa + head[best]];
        ++head[best];
    }
}
