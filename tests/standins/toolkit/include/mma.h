// Placeholder of the CUDA toolkit's <mma.h> for the CuPy stand-in (tests/standins/cupy/cuda:
// get_cuda_path): the stand-in's NVRTC checks that an included header exists in a folder given
// with -I, as NVRTC does; the kernels run under g++ with tests/runtime/cuda_shim.h, which provides
// nvcuda::wmma, so this file is never compiled.
#error "placeholder: not a real CUDA header"
