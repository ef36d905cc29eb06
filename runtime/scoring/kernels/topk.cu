// Running top-kappa of squared L2 distances, one tile of gallery columns at a time.
//
// The single source for every path that runs it: CuPy (RawModule), pycuda (SourceModule), nvcc
// (CI compiles it for sm_87, sm_90, sm_110) and g++ with tests/runtime/cuda_shim.h, which runs
// each thread of the grid in turn on the CPU. Hence: one thread per query row, no shared memory,
// no block-wide cooperation, no CUDA headers, nothing but plain C arithmetic.
//
// The dot-product tile is addressed through two strides, dots[p * stride_p + m * stride_m], so
// that it may be a row-major (P x M) matrix (stride_p = leading dimension, stride_m = 1) or its
// transpose (stride_p = 1, stride_m = P). The transpose is what a GPU wants: at each column the
// threads of a warp then read neighbouring addresses (coalesced) instead of one row each.

extern "C" __global__ void topk_tile(
    const float* dots,       // the tile's dot products q_p . g_m
    long long stride_p,      // elements between consecutive query rows of `dots`
    long long stride_m,      // elements between consecutive gallery columns of `dots`
    const float* qn,         // (P) squared norms of the queries
    const float* gn,         // (M) squared norms of the tile's gallery rows
    int n_query,             // P
    int n_cols,              // M, the tile's width
    long long tile_offset,   // global gallery index of the tile's first column
    float* best_d,           // (P, kappa) running smallest distances, ascending (start at +inf)
    long long* best_i,       // (P, kappa) their gallery indices (start at -1)
    int kappa)
{
    // 64-bit row index: P * kappa and P * stride_m may exceed 2^31 on big grids
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_query) return;  // the last block may be partly outside P

    const float* row = dots + p * stride_p;
    float* row_d = best_d + p * kappa;
    long long* row_i = best_i + p * kappa;
    const float q = qn[p];
    // most columns lose against the current worst; keep it in a register so they cost one compare
    float worst = row_d[kappa - 1];

    for (int m = 0; m < n_cols; ++m) {
        float d = q + gn[m] - 2.0f * row[m * stride_m];
        // rounding can make the distance to a duplicate slightly negative; written so that NaN
        // stays NaN (and is then never kept) rather than becoming 0
        if (d < 0.0f) d = 0.0f;
        // strictly smaller: an equal distance already kept came from a lower gallery index
        // (columns arrive in increasing index order) and keeps its place
        if (!(d < worst)) continue;
        // insertion from the back; shift only strictly larger entries, so among equal distances
        // the lower index stays first (stable)
        int j = kappa - 1;
        while (j > 0 && row_d[j - 1] > d) {
            row_d[j] = row_d[j - 1];
            row_i[j] = row_i[j - 1];
            --j;
        }
        row_d[j] = d;
        row_i[j] = tile_offset + m;
        worst = row_d[kappa - 1];
    }
}
