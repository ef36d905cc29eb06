// CPU launcher for runtime/scoring/kernels/topk.cu, for ctypes. Build (see test_cuda_kernel.py):
//   g++ -std=c++17 -O2 -shared -fPIC -include cuda_shim.h -I <kernels dir> cuda_shim_launch.cpp
// The kernel source is included rather than linked so that the compiler checks the call below
// against the kernel's real signature.
#include "topk.cu"

extern "C" void launch_topk_tile(unsigned grid, unsigned block, const float* dots, long long stride_p,
                                 long long stride_m, const float* qn, const float* gn, int n_query, int n_cols,
                                 long long tile_offset, float* best_d, long long* best_i, int kappa)
{
    cuda_shim_run({grid, 1, 1}, {block, 1, 1}, [&] {
        topk_tile(dots, stride_p, stride_m, qn, gn, n_query, n_cols, tile_offset, best_d, best_i, kappa);
    });
}
