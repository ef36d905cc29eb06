"""`spade-edge bench gpu`: its road through the CLI on the CuPy stand-in (torch on the CPU standing in
for the torch-on-GPU peer), its refusal where no GPU is usable, its float64 reference, and the
on-paper estimate. The figures of a real GPU are not (cannot be) checked here: the command's output
says which device it ran on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spade_edge.bench import gpu, gpu_paper

from .standins import STANDINS, standins_env

ROOT = Path(__file__).resolve().parents[1]


def _env_without_standins() -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != STANDINS]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _bench(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spade_edge", "bench", "gpu", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_gpu_road_on_the_standins(tmp_path):
    """The whole command on the stand-ins at tiny shapes: every row measured against both torch peers,
    ours identical to the float64 search on every checked row (exact ties planted), fused and with every
    product through memory, launches counted and printed, one image end to end through the CUDA scorer, and every line says stand-in."""
    out = tmp_path / "gpu.json"
    p = _bench(["--shapes", "tiny", "--repeats", "1", "--json", str(out)], standins_env(gpus=1))
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    text = p.stdout
    assert "Device: stand-in (numpy)" in text and "**Stand-in run**" in text
    assert "peer: stand-in: torch on the CPU" in text
    assert "CPU: " in text and "INT8 kernel" in text  # runtime/cpu.py's summary line
    r = json.loads(out.read_text())
    assert r["machine"]["standin"] is True and r["fp16_gemm_tflops"] > 0
    assert [row["row"] for row in r["rows"]] == ["tiny concat K=5", "tiny per-level K=5", "tiny concat K=8"]
    for row in r["rows"]:
        assert row["ours_identical"] == 1.0, row
        assert row["checked_rows"] == (144 if row["mode"] == "concat" else 144 + 36 + 9)
        assert row["torch_fp32_s"] > 0 and row["torch_fp16_s"] > 0 and 0 <= row["torch_fp16_identical"] <= 1
        assert isinstance(row["launches"], int) and row["launches"] > 0, row  # the scorer's own count
        line = next(x for x in text.splitlines() if x.startswith(f"| {row['row']} |"))
        assert f"| {row['launches']} |" in line and "| 1.000 |" in line
        # tiny's fine level has 40 channels: fused; beside it the same scorer with every product through memory
        assert row["ours_path"].startswith("cuda fused ") and not row["memory_path"].startswith("cuda fused ")
        assert row["memory_identical"] == 1.0 and row["memory_s"] > 0
        assert line.rstrip().endswith(f"{row['memory_s'] / row['ours_s']:.2f}x |"), line
    e2e = r["end_to_end"]
    assert e2e["backbone"] == "efficientnet_lite0" and e2e["k"] == 2
    assert "CudaScorer" in e2e["concat"]["where"] or "CUDA scorer" in e2e["concat"]["where"]
    assert e2e["concat"]["stages"]["pixel_scoring"] > 0 and "verdict" in e2e["concat"]
    assert "End to end, efficientnet_lite0" in text


@pytest.mark.parametrize(
    "standins, needle",
    [(False, "CuPy is not installed"), (True, "CuPy sees no CUDA device 0")],
    ids=["no-cupy", "no-device"],
)
def test_bench_gpu_without_a_gpu_measures_nothing_and_says_why(standins, needle):
    import importlib.util

    if not standins and importlib.util.find_spec("cupy") is not None:
        pytest.skip("the real CuPy is installed here: 'no CuPy' cannot be shown")
    env = standins_env(gpus=0) if standins else _env_without_standins()
    p = _bench(["--quick"], env, timeout=120)
    assert p.returncode == gpu.NO_GPU_EXIT, p.stdout + p.stderr
    assert needle in p.stderr and "No figure was measured" in p.stderr
    assert "TFLOP/s" not in p.stdout and "| pixel scoring |" not in p.stdout


def test_float64_search_resolves_ties_to_the_lower_index_and_the_check_can_fail():
    rng = np.random.default_rng(3)
    q = rng.random((40, 12), dtype=np.float32)
    blocks = [rng.random((30, 12), dtype=np.float32) for _ in range(3)]
    blocks[1] = blocks[0].copy()  # every row of block 1 ties with block 0's
    ref = gpu.Float64Search(q, 2)
    for b in blocks:
        ref.add(b)
    g = np.concatenate(blocks).astype(np.float64)
    d = ((q.astype(np.float64)[:, None, :] - g[None]) ** 2).sum(-1)
    want = np.lexsort((np.broadcast_to(np.arange(len(g)), d.shape), d), axis=1)[:, :2]
    np.testing.assert_array_equal(ref.i, want)
    first = ref.i[:, 0]
    assert (first < 30).any() and not ((first >= 30) & (first < 60)).any()  # block 0's twin wins the tie
    rows = np.arange(len(q))
    assert gpu._identical(ref.i, ref.i, rows) == 1.0
    swapped = np.where(ref.i < 30, ref.i + 30, ref.i)  # the tied twin: same distance, higher index
    assert gpu._identical(swapped, ref.i, rows) < 1.0


def test_the_quick_plan_and_the_full_plan():
    quick = [r.label for r in gpu.plan(quick=True)]
    assert quick == [
        "wide_resnet50_2 concat K=50",
        "wide_resnet50_2 per-level K=5",
        "efficientnet_lite0 concat K=5",
    ]
    full = {r.label for r in gpu.plan()}
    assert {f"wide_resnet50_2 {m} K={k}" for m in ("concat", "per-level") for k in (5, 50)} <= full
    assert {"efficientnet_lite0 concat K=5", "efficientnet_lite0 concat K=50"} <= full
    wrn = gpu.shapes_of("wide_resnet50_2")
    assert gpu.naive_flops(wrn, 50, "concat") == pytest.approx(1.762e12, rel=1e-3)  # 2 * 3136 * 156800 * 1792


def test_paper_estimate_counts():
    bb = gpu_paper.wrn50x2_backbone()
    assert bb["macs"] == pytest.approx(11.40e9, rel=0.005)  # torchvision's published 11.40 GMAC for WRN50x2
    assert bb["weights"] == pytest.approx(66.77e6, rel=0.001)  # its 68.88M parameters less fc (2.05M) and BN
    p, k, cells = 3136, 50, (3136, 784, 196)
    steps = {s["step"].split(":")[0]: s for s in gpu_paper.paper_steps(k, "concat")}
    fine, coarse, select = steps["products, fine level"], steps["products, coarse levels"], steps["selection"]
    # docs/speed.md, the GPU scorer: 0.44 TFLOP per image; 2.6 GB of fp32 products written and read
    # back with every product through memory, of which the fused fine level keeps 2.0 GB on chip
    assert fine["tensor"] + coarse["tensor"] == pytest.approx(0.441e12, rel=1e-3)
    assert fine["tensor"] == 2.0 * p * k * 3136 * 256
    assert coarse["tensor"] == 2.0 * p * k * (784 * 512 + 196 * 1024)
    through = 4.0 * p * k * sum(cells)
    assert through == pytest.approx(2.58e9, rel=1e-3)
    assert fine["memory_bytes"] - fine["bytes"] == 4.0 * p * k * 3136 == pytest.approx(1.967e9, rel=1e-3)
    assert fine["bytes"] == 2.0 * k * 3136 * 256 + 2.0 * p * 256  # the fine level's operands, read once
    assert coarse["bytes"] - coarse["all_fused_bytes"] == 4.0 * p * k * (784 + 196)  # still through memory
    assert select["memory_bytes"] == through and select["bytes"] == 4.0 * p * k * (784 + 196)
    assert select["all_fused_bytes"] == 0
    products = fine
    agx = gpu_paper.GPUS[0]
    assert agx.fp16_tflops == pytest.approx(170 / 4, rel=0.01)  # the technical brief's GPU: 170 sparse INT8 TOPS
    assert agx.fp32_tflops == pytest.approx(5.3, rel=0.01)
    roofline = max(
        products["tensor"] / (agx.fp16_tflops * 1e12 * gpu_paper.COMPUTE_EFFICIENCY),
        products["bytes"] / (agx.bandwidth_gbs * 1e9 * gpu_paper.MEMORY_EFFICIENCY),
    )
    assert gpu_paper.step_seconds(products, agx) == pytest.approx(roofline)
    r = gpu_paper.paper_estimate()
    concat50 = next(c for c in r["cases"] if c["mode"] == "concat" and c["k"] == 50)["estimates"][agx.name]
    assert concat50["pixel_all_fused_s"] <= concat50["pixel_s"] < concat50["pixel_memory_s"]
    assert concat50["pixel_s"] < concat50["total_s"]
    assert concat50["pixel_s"] <= 0.030  # the on-paper target for AGX Orin, as built
    assert concat50["pixel_s"] == pytest.approx(sum(concat50["steps_s"][1:-1]))  # all but backbone and image stage
    per_level = next(c for c in r["cases"] if c["mode"] == "per-level" and c["k"] == 50)["steps"]
    assert sum(s["tensor"] for s in per_level[1:]) == 2.0 * k * (3136**2 * 256 + 784**2 * 512 + 196**2 * 1024)
    assert all(s["bytes"] == s["all_fused_bytes"] for s in per_level)  # per level, every level is fused


def test_paper_table_prints_without_a_gpu():
    p = _bench(["--paper"], _env_without_standins(), timeout=120)
    assert p.returncode == 0, p.stderr
    for needle in ("Jetson AGX Orin 64GB", "Jetson Orin NX 16GB", "Jetson Orin Nano 8GB", "Technical Brief"):
        assert needle in p.stdout
    assert "WRN50x2 concat K = 50" in p.stdout and "WRN50x2 per-level K = 5" in p.stdout
    assert "**pixel scoring, as built**" in p.stdout and "every product through memory" in p.stdout


# -- jetson/gpu-check.sh -------------------------------------------------------------------------------

GPU_CHECK = ROOT / "jetson" / "gpu-check.sh"


def _gpu_check(tmp_path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "check.log"
    p = subprocess.run(
        ["bash", str(GPU_CHECK), "--log", str(log), *args],
        env={**env, "PYTHON": sys.executable},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return p, log.read_text()


def test_gpu_check_runs_the_gpu_tests_and_the_quick_bench_on_the_standins(tmp_path):
    """The script's own command lines, run: the gpu-marked test files collected by `pytest -m gpu`
    (collection only: their run is the GPU's), then `bench gpu --quick` (at tiny shapes here), its
    table and JSON, everything in the log file as on the terminal."""
    p, log = _gpu_check(
        tmp_path,
        standins_env(gpus=1),
        "--pytest-args",
        "--collect-only",
        "--bench-args",
        "--shapes tiny --no-end-to-end --repeats 1",
    )
    assert p.returncode == 0, log[-4000:]
    assert log == p.stdout  # the log holds all of it
    assert "Stand-in GPU (numpy) (stand-in)" in log and "spade_edge already imports from this checkout" in log
    assert "-m pytest -m gpu -rs" in log and "tests/gpu/test_cuda_scorer.py::" in log
    collected = int(log.split(" tests collected")[0].split()[-1])
    assert collected > 0
    assert "-m spade_edge bench gpu --quick --device 0 --json" in log and "| tiny concat K=5 |" in log
    result = json.loads((tmp_path / "check.json").read_text())
    assert all(row["ours_identical"] == 1.0 for row in result["rows"])
    assert "pytest exit 0, bench exit 0" in log


@pytest.mark.parametrize("standins", [True, False], ids=["no-device", "no-cupy"])
def test_gpu_check_without_a_gpu_stops_with_status_3_and_says_why(tmp_path, standins):
    import importlib.util

    if not standins and importlib.util.find_spec("cupy") is not None:
        pytest.skip("the real CuPy is installed here: 'no CuPy' cannot be shown")
    p, log = _gpu_check(tmp_path, standins_env(gpus=0) if standins else _env_without_standins())
    assert p.returncode == 3, log
    needle = "sees no usable CUDA device 0" if standins else "missing Python packages: cupy"
    assert needle in log and "nothing was tested or measured" in log
    assert "2/4" not in log and "-m pytest" not in log and "bench gpu" not in log  # it stopped at the probe
