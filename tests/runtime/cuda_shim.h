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
// too). Dynamic shared memory (extern __shared__) and warp intrinsics are not provided: using them
// fails to compile instead of running wrongly. atomicAdd is plain addition: fibers never run at once.
#pragma once

#ifdef __CUDACC__
#error "cuda_shim.h is for compiling CUDA sources as C++ on the CPU, not for nvcc"
#endif

#include <cmath>
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
