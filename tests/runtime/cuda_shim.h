// Makes a CUDA kernel source compile as plain C++ (g++ -include cuda_shim.h -x c++ kernel.cu), so
// that its logic runs on a machine without a GPU (DESIGN.md section 4).
//
// cuda_shim_run() runs a launch block after block; within a block, every thread is a cooperative
// fiber (ucontext) that runs until it finishes or reaches __syncthreads(), where it yields to the
// block's scheduler; the barrier opens when every thread of the block has reached it, as on a GPU.
// Threads therefore interleave only at barriers, which is one legal GPU schedule: a kernel whose
// result depends on an ordering that no barrier enforces (a data race) is not caught by this.
// A thread that exits while others wait at a barrier, or a barrier reached by some threads only, is
// reported (abort with a message): on a GPU that is undefined behaviour.
//
// `__shared__` variables (static size) are function-static thread_local storage: one copy for all the
// fibers of the block running on this OS thread, reused by the next block (uninitialised on a GPU
// too). Dynamic shared memory (extern __shared__) and warp intrinsics (shuffles, votes) are not
// provided: using them fails to compile instead of running wrongly. atomicAdd is plain addition:
// fibers never run at once.
//
// Warp-level matrix multiply (nvcuda::wmma, <mma.h>): fragments m16n16k16 of __half (matrix_a,
// matrix_b, row or col major) and float (accumulator), with fill_fragment, load_matrix_sync,
// mma_sync and store_matrix_sync. On a GPU a fragment is spread over the warp's 32 threads in an
// undocumented layout and every thread of the warp must make the call; here every thread (fiber)
// makes the call too, and each fragment holds the whole tile, so each thread computes the whole
// tile redundantly: the same values land in memory whoever stores them. mma_sync forms the exact
// products of the fp16 inputs (exact in fp32) and sums them in fp32 in order k = 0..15 after the
// accumulator: one legal order; the tensor cores' own (block FMA, truncation) is covered by the
// scorer's error bound, not reproduced. A fragment's elements (x[], num_elements) are not
// provided: their layout is opaque on a GPU, a kernel that reads them fails to compile here.
#pragma once

#ifdef __CUDACC__
#error "cuda_shim.h is for compiling CUDA sources as C++ on the CPU, not for nvcc"
#endif

#include <cmath>
#include <type_traits>
#include <cstdio>
#include <cstdlib>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__ inline
#define __host__
#define __forceinline__
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

using std::sqrt;

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// one copy per program even if several translation units include the shim (C++17 inline variables);
// thread_local: two host threads may run launches at once
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int atomicAdd(int* address, int value)
{
    int old = *address;
    *address = old + value;
    return old;
}

inline long long atomicAdd(long long* address, long long value)
{
    long long old = *address;
    *address = old + value;
    return old;
}

namespace cuda_shim {

constexpr size_t STACK = 256 * 1024;  // per thread; kernels keep candidate lists on it

struct Fiber {
    ucontext_t ctx;
    void* stack = nullptr;
    dim3 tid;
    int state = 0;  // 0 not started, 1 waiting at a barrier, 2 finished
};

struct Block {
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
};

inline thread_local Block* block_now = nullptr;
inline thread_local std::vector<void*> stack_pool;

inline void* take_stack()
{
    if (!stack_pool.empty()) {
        void* s = stack_pool.back();
        stack_pool.pop_back();
        return s;
    }
    void* s = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED) {
        std::fprintf(stderr, "cuda_shim: cannot map a fiber stack\n");
        std::abort();
    }
    return s;
}

inline void entry()
{
    Block* b = block_now;
    b->body(b->arg);
    b->current->state = 2;
    // returning ends the fiber: uc_link resumes the scheduler
}

}  // namespace cuda_shim

// Every thread of the block waits here until all have arrived.
inline void __syncthreads()
{
    cuda_shim::Block* b = cuda_shim::block_now;
    if (b == nullptr) {
        std::fprintf(stderr, "cuda_shim: __syncthreads outside a launch\n");
        std::abort();
    }
    cuda_shim::Fiber* me = b->current;
    me->state = 1;
    swapcontext(&me->ctx, &b->scheduler);
    threadIdx = me->tid;  // back in this thread: its built-in index again
}

// Runs `kernel` for every thread of a (grid x block) launch, setting the built-in index variables
// as a GPU would; each block's threads are fibers that meet at __syncthreads.
template <class Kernel>
void cuda_shim_run(dim3 grid, dim3 block, Kernel&& kernel)
{
    using namespace cuda_shim;
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    Block b;
    b.fibers.resize(n);
    b.body = [](void* k) { (*static_cast<Kernel*>(k))(); };
    b.arg = static_cast<void*>(&kernel);
    Block* outer = block_now;
    block_now = &b;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                unsigned i = 0;
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx, ++i) b.fibers[i] = Fiber{{}, nullptr, {tx, ty, tz}, 0};
                unsigned finished = 0;
                while (finished < n) {
                    // one phase: every live thread runs up to its next barrier or its end
                    unsigned waiting = 0;
                    for (auto& f : b.fibers) {
                        if (f.state == 2) continue;
                        b.current = &f;
                        threadIdx = f.tid;
                        if (f.state == 0) {
                            f.stack = take_stack();
                            getcontext(&f.ctx);
                            f.ctx.uc_stack.ss_sp = f.stack;
                            f.ctx.uc_stack.ss_size = STACK;
                            f.ctx.uc_link = &b.scheduler;
                            makecontext(&f.ctx, entry, 0);
                        }
                        swapcontext(&b.scheduler, &f.ctx);
                        if (f.state == 2) {
                            stack_pool.push_back(f.stack);
                            f.stack = nullptr;
                            ++finished;
                        } else {
                            ++waiting;
                        }
                    }
                    if (waiting && finished) {
                        std::fprintf(stderr,
                                     "cuda_shim: block (%u,%u,%u): %u threads wait at __syncthreads while %u "
                                     "have exited (undefined behaviour on a GPU)\n",
                                     bx, by, bz, waiting, finished);
                        std::abort();
                    }
                }
            }
    block_now = outer;
}

// ---------------------------------------------------------------------------- __half and wmma

// fp16 as stored (IEEE binary16 bits); conversions round to nearest even, as __float2half_rn
struct __half {
    unsigned short bits;
};

namespace cuda_shim {

inline float half_bits_to_float(unsigned short h)
{
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    float v;
    if (exp == 0)
        v = std::ldexp((float)man, -24);  // subnormal or zero: exact
    else if (exp == 0x1Fu)
        v = man ? NAN : INFINITY;
    else
        v = std::ldexp((float)(man | 0x400u), (int)exp - 25);
    return sign ? -v : v;
}

}  // namespace cuda_shim

inline float __half2float(__half h) { return cuda_shim::half_bits_to_float(h.bits); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct tile_rows;
template <int M, int N, int K>
struct tile_rows<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_rows<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_rows<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

// the whole tile, row-major in `v` whatever the memory layout it was loaded from (emulation only)
template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
    static_assert(M == 16 && N == 16 && K == 16, "cuda_shim: only the m16n16k16 wmma shape is emulated");

  public:
    static constexpr int rows = tile_rows<Use, M, N, K>::rows, cols = tile_rows<Use, M, N, K>::cols;
    float v[rows * cols];  // fp16 inputs held as their exact fp32 values
};

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& f, float value)
{
    for (float& x : f.v) x = value;
}

inline void check_ldm(unsigned ldm, unsigned multiple, const void* ptr)
{
    // the hardware's rules: ldm a multiple of 16 bytes, the pointer 256-bit aligned
    if (ldm % multiple != 0 || reinterpret_cast<unsigned long>(ptr) % 32 != 0) {
        std::fprintf(stderr, "cuda_shim: wmma load/store with ldm %u or pointer %p misaligned\n", ldm, ptr);
        std::abort();
    }
}

template <class Use, int M, int N, int K, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, __half, Layout>& f, const __half* p, unsigned ldm)
{
    check_ldm(ldm, 8, p);
    using F = fragment<Use, M, N, K, __half, Layout>;
    constexpr bool col = std::is_same<Layout, col_major>::value;
    static_assert(col || std::is_same<Layout, row_major>::value, "cuda_shim: matrix_a/b need a layout");
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c) f.v[r * F::cols + c] = __half2float(col ? p[c * ldm + r] : p[r * ldm + c]);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout)
{
    check_ldm(ldm, 4, p);
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) f.v[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout)
{
    check_ldm(ldm, 4, p);
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.v[r * N + c];
}

// d = a b + c, each product exact (fp16 x fp16 fits fp32), summed in fp32 after c
template <int M, int N, int K, class La, class Lb>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, __half, La>& a,
                     const fragment<matrix_b, M, N, K, __half, Lb>& b, const fragment<accumulator, M, N, K, float>& c)
{
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.v[i * N + j];
            for (int k = 0; k < K; ++k) s += a.v[i * K + k] * b.v[k * N + j];
            out[i * N + j] = s;
        }
    for (int i = 0; i < M * N; ++i) d.v[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
