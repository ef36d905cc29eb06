"""GPU pixel scoring on paper: per image, the FLOPs, bytes and time of every step on Jetson Orin
modules (and an H200 for comparison with ``bench gpu``), from their data-sheet rates derated by
stated assumptions (docs/speed.md, "GPU scoring on Jetson, on paper"). ``spade-edge bench gpu
--paper`` prints :func:`paper_markdown`; ``python -m spade_edge.bench.gpu_paper`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .gpu import KAPPA, shapes_of


@dataclass(frozen=True)
class Gpu:
    """Peak rates of a GPU as its data sheet gives them (dense fp16 tensor, fp32 and fp64 on the CUDA
    cores, memory bandwidth)."""

    name: str
    fp16_tflops: float  # dense, tensor cores, fp32 accumulation
    fp32_tflops: float  # CUDA cores
    fp64_tflops: float
    bandwidth_gbs: float


ORIN_SOURCES = (
    "NVIDIA Jetson AGX Orin Series Technical Brief v1.2 (GPU: 16 SMs, 2048 CUDA cores, 5.3 FP32 TFLOPS, "
    "64 tensor cores, 170 sparse INT8 TOPS at 1.3 GHz, 4 MB L2); NVIDIA Jetson AGX Orin, Orin NX and Orin "
    "Nano series data sheets (GPU SMs and maximum clock per module, memory bandwidth 204.8, 102.4 and 68 GB/s; "
    "Orin Nano Super, JetPack 6.1 and later: 1020 MHz, 102 GB/s); NVIDIA H200 data sheet (SXM: 1979 TFLOPS "
    "fp16 with sparsity, 67 TFLOPS fp32, 34 TFLOPS fp64, 4.8 TB/s)"
)


def _orin(name: str, sms: int, mhz: float, gbs: float) -> Gpu:
    """An Orin module from its SMs and GPU clock: each SM has 4 tensor cores of 256 dense fp16 FMA per
    clock (so AGX Orin 64GB: 16 x 4 x 256 x 2 x 1.3 GHz = 42.6 TFLOPS = its 170 sparse INT8 TOPS / 4)
    and 128 CUDA cores; fp64 at 1/64 of fp32 as on the other GA10x Ampere GPUs (the data sheets give none)."""
    clock = mhz * 1e6
    fp32 = sms * 128 * 2 * clock / 1e12
    return Gpu(name, sms * 4 * 256 * 2 * clock / 1e12, fp32, fp32 / 64, gbs)


GPUS = (
    _orin("Jetson AGX Orin 64GB (MAXN)", 16, 1300, 204.8),
    _orin("Jetson AGX Orin 32GB", 14, 930, 204.8),
    _orin("Jetson Orin NX 16GB", 8, 918, 102.4),
    _orin("Jetson Orin Nano 8GB", 8, 625, 68.0),
    _orin("Jetson Orin Nano 8GB Super", 8, 1020, 102.4),
    Gpu("H200 SXM (for comparison with bench gpu)", 989.5, 67.0, 34.0, 4800.0),
)
COMPUTE_EFFICIENCY = 0.6  # share of the dense peaks a tuned kernel reaches (assumed; bench gpu measures it)
MEMORY_EFFICIENCY = 0.7  # share of the peak bandwidth a streaming kernel reaches (assumed)
RESCORED_PER_ROW = 2  # candidates per query row re-computed exactly (assumed from the CPU screens; bench gpu prints it)
IMAGE_GALLERY = 200  # normal images searched by the image stage (its global kNN)
SELECT_FLOPS = {"concat": 20.0, "per-level": 4.0}  # per fine pair: 9 product reads, 8 tap FMAs, compare


def wrn50x2_backbone(size: int = 224) -> dict:
    """FLOPs, weights and activations of WRN50x2 up to layer4's pooled vector (what the exported model
    computes) at ``size`` x ``size``, counted conv by conv (torchvision's layout: stride on the 3x3)."""
    convs = []  # (c_in, c_out, kernel, output side)
    side = size // 2
    convs.append((3, 64, 7, side))
    side //= 2  # max pool
    c_in = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2**stage
        width, c_out = planes * 2, planes * 4  # wide: twice the bottleneck width
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            out_side = side // stride
            convs += [(c_in, width, 1, side), (width, width, 3, out_side), (width, c_out, 1, out_side)]
            if block == 0:
                convs.append((c_in, c_out, 1, out_side))
            c_in, side = c_out, out_side
    macs = sum(ci * co * k * k * s * s for ci, co, k, s in convs)
    weights = sum(ci * co * k * k for ci, co, k, _ in convs)
    activations = sum(co * s * s for _, co, _, s in convs) + 3 * size * size
    return {"flops": 2.0 * macs, "macs": float(macs), "weights": float(weights), "activations": float(activations)}


def _step(name: str, tensor=0.0, simt=0.0, fp64=0.0, bytes_=0.0, memory_bytes=None, all_fused_bytes=None) -> dict:
    """One step: FLOPs, and bytes to and from device memory as built (``bytes``), with every product
    through memory (``memory_bytes``: ``CudaScorer(fused=False)``, the design before the fused kernel)
    and with every level's product fused (``all_fused_bytes``: not built)."""
    return {
        "step": name,
        "tensor": float(tensor),
        "simt": float(simt),
        "fp64": float(fp64),
        "bytes": float(bytes_),
        "memory_bytes": float(bytes_ if memory_bytes is None else memory_bytes),
        "all_fused_bytes": float(bytes_ if all_fused_bytes is None else all_fused_bytes),
    }


VARIANTS = {"built": "bytes", "memory": "memory_bytes", "all_fused": "all_fused_bytes"}


def paper_steps(k: int, mode: str, levels: list[tuple[int, int, int]] | None = None) -> list[dict]:
    """Per image, WRN50x2 at 224 with K = ``k`` retrieved images, the CUDA scorer as built
    (docs/speed.md, "The GPU scorer"): each step's FLOPs (``tensor``: fp16 products on tensor cores;
    ``simt``: fp32 on CUDA cores; ``fp64``) and bytes to and from device memory (``bytes``; see
    :func:`_step` for the other designs' bytes). The fine level's product (concat: layer1; per-level:
    every level, each a search of its own) is fused with the selection (kernel ``fused_select``: tiles
    of products in shared memory, never in device memory; its operands read from memory once, the
    reuse across a block's tiles served by L2); concat's coarse levels go through one GEMM each at
    native gallery resolution against the query upsampled to the fine grid, fp32 products written and
    read back by the selection, which interpolates their taps. Then the decision and the exact
    re-computation in fp64 of :data:`RESCORED_PER_ROW` candidates per query row, and the image stage."""
    levels = levels or shapes_of("wide_resnet50_2")
    bb = wrn50x2_backbone()
    h, w, _ = levels[0]
    p = h * w
    gathered = sum(k * hh * ww * cc for hh, ww, cc in levels)  # values of the K images' levels
    steps = [
        _step(
            "backbone (WRN50x2, 224 px, conv by conv)",
            tensor=bb["flops"],
            bytes_=2 * bb["weights"] + 2 * 2 * bb["activations"],  # fp16 weights once; each output written, read
        ),
        # stored fp16 read, fp16 written (int8 would read half)
        _step("gather the K images' levels on the device, fp16", bytes_=2 * 2.0 * gathered),
    ]
    if mode == "concat":
        d = sum(cc for _, _, cc in levels)
        (_, _, c0), coarse = levels[0], levels[1:]
        fine_products = p * k * p
        coarse_products = sum(p * k * hh * ww for hh, ww, _ in coarse)  # P x K n_l per coarse level
        steps += [
            _step("query: coarse levels upsampled to the fine grid, fp16", simt=8.0 * p * d, bytes_=2.0 * p * d),
            _step(
                "products, fine level: fused with the selection, P x K n_0 x C_0 (fp16 in, fp32 in shared memory)",
                tensor=2.0 * fine_products * c0,
                bytes_=2.0 * k * p * c0 + 2.0 * p * c0,
                memory_bytes=2.0 * k * p * c0 + 2.0 * p * c0 + 4.0 * fine_products,
            ),
            _step(
                "products, coarse levels: one GEMM each, P x K n_l x C_l (fp16 in, fp32 out)",
                tensor=sum(2.0 * p * k * hh * ww * cc for hh, ww, cc in coarse),
                bytes_=2.0 * (gathered - k * p * c0) + 2.0 * p * (d - c0) + 4.0 * coarse_products,
                all_fused_bytes=2.0 * (gathered - k * p * c0) + 2.0 * p * (d - c0),
            ),
            _step(
                "selection: coarse taps interpolated, kappa + spare kept per row",
                simt=SELECT_FLOPS["concat"] * p * k * p,
                bytes_=4.0 * coarse_products,
                memory_bytes=4.0 * (fine_products + coarse_products),
                all_fused_bytes=0.0,
            ),
        ]
        rescore = [(p, d + 3 * sum(cc for _, _, cc in levels[1:]))]  # fine row + 4 taps per coarse level
    else:
        for hh, ww, cc in levels:
            n = hh * ww
            steps += [
                _step(
                    f"level {hh}x{ww}x{cc}: products n x K n x C, fused with the selection (fp16 in, fp32 in shared "
                    "memory)",
                    tensor=2.0 * n * k * n * cc,
                    bytes_=2.0 * k * n * cc + 2.0 * n * cc,
                    memory_bytes=2.0 * k * n * cc + 2.0 * n * cc + 4.0 * n * k * n,
                ),
                _step(
                    f"level {hh}x{ww}x{cc}: selection",
                    simt=SELECT_FLOPS["per-level"] * n * k * n,
                    memory_bytes=4.0 * n * k * n,
                ),
            ]
        rescore = [(hh * ww, cc) for hh, ww, cc in levels]
    steps += [
        _step(
            f"decision and exact re-computation in fp64 ({RESCORED_PER_ROW} candidates per row)",
            fp64=sum(3.0 * rows * RESCORED_PER_ROW * dd for rows, dd in rescore),
            bytes_=sum(2.0 * rows * RESCORED_PER_ROW * dd for rows, dd in rescore),
        ),
        _step(
            f"image stage: kNN of the 2048-d global vector over {IMAGE_GALLERY} images",
            simt=2.0 * IMAGE_GALLERY * 2048,
            bytes_=2.0 * IMAGE_GALLERY * 2048,
        ),
    ]
    return steps


def step_seconds(step: dict, gpu: Gpu, variant: str = "built") -> float:
    """Roofline time of a step: the slower of its compute (tensor, CUDA-core and fp64 parts, derated by
    :data:`COMPUTE_EFFICIENCY`) and its memory traffic (derated by :data:`MEMORY_EFFICIENCY`) in the
    design ``variant`` (:data:`VARIANTS`: as built, every product through memory, every level fused)."""
    compute = step["tensor"] / gpu.fp16_tflops + step["simt"] / gpu.fp32_tflops + step["fp64"] / gpu.fp64_tflops
    traffic = step[VARIANTS[variant]]
    return max(compute / 1e12 / COMPUTE_EFFICIENCY, traffic / (gpu.bandwidth_gbs * 1e9 * MEMORY_EFFICIENCY))


def _is_pixel(step: dict) -> bool:
    return not step["step"].startswith(("backbone", "image stage"))


def paper_estimate(cases: tuple = (("concat", 50), ("concat", 5), ("per-level", 50), ("per-level", 5))) -> dict:
    """Per case (mode, K): the steps' FLOPs and bytes (:func:`paper_steps`), and per GPU of :data:`GPUS`
    each step's estimated seconds as built, the pixel scoring's (every step but the backbone and the
    image stage) as built (``pixel_s``), with every product through memory (``pixel_memory_s``) and
    with every level fused (``pixel_all_fused_s``), and the total (backbone through image stage) as built."""
    out: dict[str, Any] = {
        "gpus": [g.__dict__ for g in GPUS],
        "compute_efficiency": COMPUTE_EFFICIENCY,
        "memory_efficiency": MEMORY_EFFICIENCY,
        "cases": [],
    }
    for mode, k in cases:
        steps = paper_steps(k, mode)
        case: dict[str, Any] = {"mode": mode, "k": k, "steps": steps, "estimates": {}}
        for g in GPUS:

            def pixel(variant: str, g=g, steps=steps) -> float:
                return sum(step_seconds(s, g, variant) for s in steps if _is_pixel(s))

            case["estimates"][g.name] = {
                "steps_s": [step_seconds(s, g) for s in steps],
                "pixel_s": pixel("built"),
                "pixel_memory_s": pixel("memory"),
                "pixel_all_fused_s": pixel("all_fused"),
                "total_s": sum(step_seconds(s, g) for s in steps),
            }
        out["cases"].append(case)
    return out


def _si(x: float, unit: str) -> str:
    if x == 0:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def paper_markdown(r: dict | None = None) -> str:
    """The on-paper tables: the rates assumed, then per case the steps' FLOPs and bytes and, per GPU,
    the estimated milliseconds."""
    r = r or paper_estimate()
    lines = [
        "Rates assumed: dense fp16 tensor = SMs x 4 tensor cores x 256 FMA/clock x 2 x GPU clock (= the GPU's "
        "sparse INT8 TOPS / 4); fp32 = CUDA cores x 2 x clock; fp64 = fp32 / 64 (GA10x; assumed). Each step "
        f"takes the slower of its compute at {r['compute_efficiency']:.0%} of these peaks and its memory traffic "
        f"at {r['memory_efficiency']:.0%} of the bandwidth.",
        "",
        "| GPU | fp16 tensor TFLOPS (dense) | fp32 TFLOPS | fp64 TFLOPS | memory GB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in r["gpus"]:
        lines.append(
            f"| {g['name']} | {g['fp16_tflops']:.1f} | {g['fp32_tflops']:.2f} | {g['fp64_tflops']:.3g} | "
            f"{g['bandwidth_gbs']:.1f} |"
        )
    lines += ["", f"Sources: {ORIN_SOURCES}.", ""]
    names = [g["name"] for g in r["gpus"]]
    lines += [
        "Per image, ms: pixel scoring as built (the fine level's product fused with the selection, coarse levels "
        "through memory) / with every product through memory (the design before) / with every level fused (not "
        "built) / total as built (backbone through image stage):",
        "",
        "| WRN50x2 | " + " | ".join(n.split(" (")[0].replace("Jetson ", "") for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for case in r["cases"]:
        e = case["estimates"]
        cells = [
            f"{e[n]['pixel_s'] * 1e3:.1f} / {e[n]['pixel_memory_s'] * 1e3:.1f} / {e[n]['pixel_all_fused_s'] * 1e3:.1f}"
            f" / {e[n]['total_s'] * 1e3:.1f}"
            for n in names
        ]
        lines.append(f"| {case['mode']} K = {case['k']} | " + " | ".join(cells) + " |")
    lines.append("")
    for case in r["cases"]:
        names = list(case["estimates"])
        short = [n.split(" (")[0].replace("Jetson ", "") for n in names]
        lines += [
            f"WRN50x2 {case['mode']} K = {case['k']}, kappa = {KAPPA}, per image; ms per step on each GPU:",
            "",
            "| step | tensor FLOP | fp32 FLOP | fp64 FLOP | bytes | bytes, all through memory | bytes, all fused | "
            + " | ".join(short)
            + " |",
            "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names),
        ]
        for i, s in enumerate(case["steps"]):
            ms = " | ".join(f"{case['estimates'][n]['steps_s'][i] * 1e3:.2f}" for n in names)
            lines.append(
                f"| {s['step']} | {_si(s['tensor'], 'FLOP')} | {_si(s['simt'], 'FLOP')} | {_si(s['fp64'], 'FLOP')} | "
                f"{_si(s['bytes'], 'B')} | {_si(s['memory_bytes'], 'B')} | {_si(s['all_fused_bytes'], 'B')} | {ms} |"
            )
        for key, label in (
            ("pixel_s", "**pixel scoring, as built** (fused: concat's fine level, every level per-level)"),
            ("pixel_memory_s", "pixel scoring with every product through memory (fused=False)"),
            ("pixel_all_fused_s", "pixel scoring with every level fused (not built)"),
            ("total_s", "**total, as built** (backbone through image stage)"),
        ):
            ms = " | ".join(f"{case['estimates'][n][key] * 1e3:.1f}" for n in names)
            lines.append(f"| {label} | | | | | | | {ms} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(paper_markdown())
