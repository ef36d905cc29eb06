"""The Python half of ``jetson/bench.sh``: latency percentiles of the detector over a folder of
images, and a summary of a tegrastats log (power, GPU load, memory), merged into one JSON result.

    spade-edge bench jetson run -m model.onnx -g parts.gallery -i images/ -o lat.json
    spade-edge bench jetson report --latency lat.json --tegrastats t.log \\
        --nvpmodel nvpmodel.txt --clocks clocks.txt -o result.json

The shell script owns the device tools (nvpmodel, jetson_clocks, tegrastats); this module owns the
numbers. Nothing here needs a Jetson, so it is tested on any machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_GR3D_GPCS = re.compile(r"\bGR3D_FREQ \d+%@\[([\d,]+)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
# power rails: 'VDD_IN 4736mW/4736mW' (JetPack 5-7) or 'POM_5V_IN 2545/2547' (JetPack 4)
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
# the rail that measures the whole module, by board family, best first
TOTAL_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN", "VIN")


def parse_tegrastats_line(line: str) -> dict | None:
    """One tegrastats line -> numbers (None for a line without the RAM field, e.g. a blank)."""
    ram = _RAM.search(line)
    if not ram:
        return None
    out: dict = {"ram_used_mb": int(ram.group(1)), "ram_total_mb": int(ram.group(2))}
    if m := _SWAP.search(line):
        out["swap_used_mb"] = int(m.group(1))
    if m := _GR3D.search(line):
        out["gpu_load_pct"] = int(m.group(1))
    if m := _EMC.search(line):
        out["emc_load_pct"] = int(m.group(1))
    if m := _CPU.search(line):
        loads = [int(c.split("%")[0]) for c in m.group(1).split(",") if "%" in c]
        if loads:
            out["cpu_load_pct"] = round(sum(loads) / len(loads), 1)
    rails = {}
    for name, cur, _avg in _RAIL.findall(line):
        if name not in ("RAM", "SWAP", "IRAM"):
            rails[name] = int(cur)
    if rails:
        out["power_mw"] = rails
    temps = {k.lower(): float(v) for k, v in _TEMP.findall(line)}
    if temps:
        out["temp_c"] = temps
    return out


def summarize_tegrastats(lines, seconds: float | None = None, images: int | None = None) -> dict:
    """Mean and max of each quantity over the samples; energy per image where a total rail exists."""
    samples = [s for s in (parse_tegrastats_line(x) for x in lines) if s]
    if not samples:
        return {"available": False, "reason": "no tegrastats samples"}

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": round(statistics.fmean(values), 1), "max": max(values)}

    out: dict = {"available": True, "samples": len(samples)}
    for key in ("ram_used_mb", "swap_used_mb", "gpu_load_pct", "emc_load_pct", "cpu_load_pct"):
        s = stat([x.get(key) for x in samples])
        if s:
            out[key] = s
    out["ram_total_mb"] = samples[0]["ram_total_mb"]
    rails = sorted({r for x in samples for r in x.get("power_mw", {})})
    if rails:
        out["power_mw"] = {r: stat([x.get("power_mw", {}).get(r) for x in samples]) for r in rails}
        total = next((r for r in TOTAL_RAILS if r in rails), None)
        out["total_rail"] = total
        if total and seconds and images:
            mean_w = out["power_mw"][total]["mean"] / 1e3
            out["energy_per_image_mj"] = round(mean_w * seconds / images * 1e3, 2)
    temps = sorted({t for x in samples for t in x.get("temp_c", {})})
    if temps:
        out["temp_c_max"] = {t: max(x["temp_c"][t] for x in samples if t in x.get("temp_c", {})) for t in temps}
    return out


def percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {}
    v = sorted(values_ms)

    def q(p):  # nearest-rank on sorted values, linear between neighbours
        k = (len(v) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {
        "n": len(v),
        "mean": round(statistics.fmean(v), 3),
        "p50": round(q(0.5), 3),
        "p90": round(q(0.9), 3),
        "p95": round(q(0.95), 3),
        "p99": round(q(0.99), 3),
        "max": round(v[-1], 3),
        "min": round(v[0], 3),
    }


def run_latency(model, gallery, images_dir, device="auto", threads=None, warmup=5, repeat=1, fp16=False) -> dict:
    """Time :meth:`Detector.predict` on every image of ``images_dir`` (bytes preloaded: disk excluded)."""
    from ..runtime.detector import Detector
    from ..runtime.errors import ImageError
    from ..runtime.images import IMAGE_SUFFIXES

    files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    data = [(p.name, p.read_bytes()) for p in files]
    t0 = time.perf_counter()
    det = Detector.load(model, gallery, device=device, threads=threads, fp16=fp16)
    load_s = time.perf_counter() - t0
    for i in range(warmup):
        det.predict(data[i % len(data)][1])
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    verdicts: dict[str, int] = {}
    start = time.perf_counter()
    for _ in range(repeat):
        for name, blob in data:
            t = time.perf_counter()
            p = det.predict(blob, name=name)
            totals.append((time.perf_counter() - t) * 1e3)
            for k, v in p.timings.items():
                stages.setdefault(k, []).append(v * 1e3)
            verdicts[str(p.verdict)] = verdicts.get(str(p.verdict), 0) + 1
    wall = time.perf_counter() - start
    return {
        "model": str(model),
        "gallery": str(gallery),
        "images_dir": str(images_dir),
        "images": len(data),
        "repeat": repeat,
        "warmup": warmup,
        "device": device,
        "threads": threads,
        "ran_on": det.device,
        "scorer": det.scorer.name,
        "device_fallback": det.fallback,
        "load_s": round(load_s, 3),
        "wall_s": round(wall, 3),
        "throughput_img_s": round(len(totals) / wall, 2) if wall > 0 else None,
        "latency_ms": percentiles(totals),
        "stages_ms_p50": {k: percentiles(v)["p50"] for k, v in stages.items()},
        "verdicts": verdicts,
        "config": det.config.to_dict(),
    }


def _read(path: str | None) -> str | None:
    if not path or not os.path.exists(path):
        return None
    text = Path(path).read_text(errors="replace").strip()
    return text or None


def power_mode(nvpmodel_text: str | None, clocks_text: str | None) -> dict:
    """What nvpmodel -q and jetson_clocks --show said (raw text kept; the mode name pulled out)."""
    out: dict = {"nvpmodel": nvpmodel_text, "jetson_clocks": clocks_text}
    if nvpmodel_text and (m := re.search(r"NV Power Mode:\s*(\S+)", nvpmodel_text)):
        out["mode"] = m.group(1)
        if n := re.search(r"^\s*(\d+)\s*$", nvpmodel_text, re.M):
            out["mode_id"] = int(n.group(1))
    if clocks_text:
        # jetson_clocks pins CPU and GPU min = max frequency (EMC is pinned by an override flag instead)
        pairs = [
            m.groups()
            for line in clocks_text.splitlines()
            if line.lstrip().startswith(("cpu", "GPU"))
            for m in [re.search(r"MinFreq=(\d+) MaxFreq=(\d+)", line)]
            if m
        ]
        if pairs:
            out["clocks_pinned"] = all(a == b for a, b in pairs)
    return out


def report(latency: dict, tegrastats_lines, nvpmodel_text, clocks_text, meta: dict) -> dict:
    seconds, n = latency.get("wall_s"), latency.get("latency_ms", {}).get("n")
    if tegrastats_lines is None:
        teg = {"available": False, "reason": meta.pop("tegrastats_reason", "tegrastats not run")}
    else:
        teg = summarize_tegrastats(tegrastats_lines, seconds, n)
    return {
        "spade_edge_bench": 1,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "machine": platform.machine(),
        **meta,
        "power": power_mode(nvpmodel_text, clocks_text),
        **latency,
        "tegrastats": teg,
    }


def report_files(
    latency: str | os.PathLike, tegrastats: str | None, nvpmodel: str | None, clocks: str | None, meta: dict
) -> dict:
    """:func:`report` from the files bench.sh writes (an absent or empty file: not available)."""
    teg = _read(tegrastats)
    return report(
        json.loads(Path(latency).read_text()),
        teg.splitlines() if teg else None,
        _read(nvpmodel),
        _read(clocks),
        dict(meta),
    )


def summary(out, result: dict) -> str:
    """One line for the terminal: where the result went, and its latency percentiles."""
    lat = result.get("latency_ms", {})
    return f"{out}: {lat.get('n')} images, p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, p99 {lat.get('p99')} ms"
