// Makes a CUDA kernel source compile as plain C++ (g++ -include cuda_shim.h -x c++ kernel.cu), so
// that its logic runs on a machine without a GPU: cuda_shim_run() calls the kernel once for every
// thread of the grid, one after the other. Only valid for kernels whose threads do not cooperate
// (no __shared__, no __syncthreads, no warp intrinsics), which the shim deliberately does not
// provide: using them fails to compile instead of running wrongly.
#pragma once

#ifdef __CUDACC__
#error "cuda_shim.h is for compiling CUDA sources as C++ on the CPU, not for nvcc"
#endif

#define __global__
#define __device__ inline
#define __host__
#define __forceinline__ inline

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// one copy per program even if several translation units include the shim (C++17 inline variables)
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// Runs `kernel` for every thread of a (grid x block) launch, sequentially, setting the built-in
// index variables as a GPU would.
template <class Kernel>
void cuda_shim_run(dim3 grid, dim3 block, Kernel&& kernel)
{
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx)
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            kernel();
                        }
}
