"""What this CPU is, for the code paths chosen by CPU feature and for every speed figure: the model
name, its instruction sets, and which kernel ONNX Runtime's INT8 products run on here."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# the flags that choose a kernel somewhere in the stack (numpy, ONNX Runtime's MLAS, our C kernels)
X86_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")
# x86 int8 dot products without saturation: VNNI accumulates u8 x s8 into 32 bits directly
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


# (leaf, subleaf, register, bit) of the x86 flags above, as CPUID reports them
CPUID_BITS = {
    "sse4_2": (1, 0, 2, 20),
    "avx": (1, 0, 2, 28),
    "fma": (1, 0, 2, 12),
    "f16c": (1, 0, 2, 29),
    "avx2": (7, 0, 1, 5),
    "avx512f": (7, 0, 1, 16),
    "avx512bw": (7, 0, 1, 30),
    "avx512vl": (7, 0, 1, 31),
    "avx512_vnni": (7, 0, 2, 11),
    "avx512_fp16": (7, 0, 3, 23),
    "amx_bf16": (7, 0, 3, 22),
    "amx_tile": (7, 0, 3, 24),
    "amx_int8": (7, 0, 3, 25),
    "avx_vnni": (7, 1, 0, 4),
    "avx512_bf16": (7, 1, 0, 5),
}
# cpuid(leaf=edi, subleaf=esi) -> eax, ebx, ecx, edx stored at rdx (x86-64 System V)
_CPUID_CODE = bytes.fromhex("5389f889f14989d00fa241890041895804418948084189500c5bc3")


def _cpuid() -> tuple[str, set[str]] | None:
    """(brand string, x86 flags) straight from CPUID: what ONNX Runtime and numpy dispatch on, also
    under an emulator (whose /proc/cpuinfo is the host's). None where the code cannot be run."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    import ctypes
    import mmap

    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W+X refused by a hardened kernel
        return None
    buf.write(_CPUID_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(addr)
    regs = (ctypes.c_uint32 * 4)()

    def call(leaf: int, sub: int = 0) -> tuple[int, ...]:
        fn(leaf, sub, ctypes.addressof(regs))
        return tuple(regs)

    top, out = call(0)[0], set()
    for flag, (leaf, sub, reg, bit) in CPUID_BITS.items():
        if leaf <= top and call(leaf, sub)[reg] >> bit & 1:
            out.add(flag)
    brand = b""
    if call(0x80000000)[0] >= 0x80000004:
        brand = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004) for r in call(leaf))
    return brand.rstrip(b"\0").decode("ascii", "replace").strip(), out


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""
    name, found = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not found:
            found = set(value.split())
    direct = _cpuid()
    if direct is not None:  # CPUID decides what it covers; AMX also needs the kernel's consent (cpuinfo)
        brand, bits = direct
        amx = {f for f in bits if f.startswith("amx")} - found
        found = (found - set(CPUID_BITS)) | (bits - amx)
        name = brand or name
    return name or platform.processor() or platform.machine(), frozenset(found)


def model_name() -> str:
    """The CPU's model name ('AMD EPYC 7B13', 'Intel(R) Xeon(R) Platinum 8481C', ...)."""
    return _cpuinfo()[0]


def flags() -> frozenset[str]:
    """Every instruction-set flag the kernel reports for this CPU (/proc/cpuinfo)."""
    return _cpuinfo()[1]


def features() -> dict[str, bool]:
    """The instruction sets that choose kernels, present or not: what to print with a speed figure."""
    names = ARM_FLAGS if platform.machine() in ("aarch64", "arm64") else X86_FLAGS
    have = flags()
    return {f: f in have for f in names}


def has(*names: str) -> bool:
    """Whether this CPU has every one of ``names``."""
    return set(names) <= flags()


def int8_kernel() -> tuple[str, bool]:
    """(the instructions ONNX Runtime's CPU INT8 products use here, whether 8-bit weights are exact).

    On x86 without VNNI, MLAS multiplies u8 activations by s8 weights with VPMADDUBSW, whose 16-bit
    pair sums saturate once two products pass 32767: weights limited to 7 bits (|w| <= 64) cannot
    reach it, full 8-bit weights can, and then features come out silently wrong. VNNI, AMX and Arm's
    dot products accumulate in 32 bits."""
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        return ("Arm SDOT/UDOT" if has("asimddp") else "Arm NEON widening multiply"), True
    if machine not in ("x86_64", "AMD64"):
        return f"{machine} (unknown)", True
    for flag, label in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI")):
        if flag in flags():
            return label, True
    if has("avx512bw"):
        return "AVX-512BW VPMADDUBSW (16-bit pair sums saturate)", False
    if has("avx2"):
        return "AVX2 VPMADDUBSW (16-bit pair sums saturate)", False
    return "SSE widening multiply", True


def summary() -> str:
    """One line for a report: model, instruction sets present, INT8 kernel."""
    present = [f for f, ok in features().items() if ok]
    return f"{model_name()} ({platform.machine()}): {' '.join(present) or 'no SIMD flags read'}; INT8 kernel {int8_kernel()[0]}"


def measured_on() -> dict[str, str]:
    """What a reduced-precision figure was measured on: the CPU, its INT8 kernel, and the summary line."""
    return {"cpu": model_name(), "int8_kernel": int8_kernel()[0], "summary": summary()}
