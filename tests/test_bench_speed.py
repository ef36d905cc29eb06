"""`bench speed`: every measurement in a fresh process of its own (no foreign thread pool beside the
one measured, the thread setting applied there); the peers find the same neighbours as ours, and the
table reports the runtime's path, the CPU's instruction sets and a standalone prediction; the profile
accounts for the whole run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the bench extra (faiss-cpu) is not installed")


def test_scoring_peers_agree_and_the_table_reports_them(monkeypatch):
    from spade_edge.bench import speed
    from spade_edge.runtime.scoring import cpu_scorer

    monkeypatch.setitem(speed.SHAPES, "tiny", [(12, 12, 40), (6, 6, 80), (3, 3, 160)])
    r = speed.scoring("tiny", 3, repeats=1)
    # the scorer named is the one whose own stats (made by its search, in the measuring process) show
    # that its path ran: the screen for 'amx', the per-level-cost products for 'numpy' and the fused
    # scorers (these shapes are wide enough for them)
    assert r["scorer"] in ("amx", "numpy") or r["scorer"].startswith("fused ")
    assert r["ours_stats"]["path"] == _wide_pyramid_path(cpu_scorer())
    assert r["scorer"] == cpu_scorer().name
    assert r["same_neighbours_as_faiss"] == 1.0 and r["same_neighbours_as_fp32"] == 1.0
    assert r["gflop"] == pytest.approx(2 * 144 * 144 * 3 * 280 / 1e9)
    for key in ("ours_levels_s", "fp32_levels_s", "ours_s", "faiss_s", "torch_s", "numpy_s"):
        assert r[key] > 0
    pids = {p["pid"] for p in r["processes"].values()}
    assert len(pids) == len(speed.SCORING_PARTS) and os.getpid() not in pids  # one fresh process per method
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {"tiny K=3": r}})
    row = next(line for line in table.splitlines() if line.startswith("| tiny K=3"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert r["scorer"] in cells[0]
    assert float(cells[2]) == pytest.approx(r["ours_levels_s"], abs=0.006)  # 'ours' is the runtime's path
    assert cells[8] == f"{r['faiss_s'] / r['ours_levels_s']:.2f}x"


def test_each_measurement_runs_alone_with_the_thread_setting():
    """faiss's OpenMP pool lives in faiss's measuring process only, not in the one measured after it;
    the thread setting reaches every pool of the child."""
    from spade_edge.bench import speed

    args = {"shapes": speed.TINY_SHAPES["tiny"], "k": 2, "repeats": 1}
    faiss = speed.in_fresh_process("scoring_part", 1, part="faiss", **args)
    ours = speed.in_fresh_process("scoring_part", 1, part="ours", **args)
    assert len({os.getpid(), faiss["process"]["pid"], ours["process"]["pid"]}) == 3
    apis = {name: {p["user_api"] for p in r["process"]["pools"]} for name, r in (("faiss", faiss), ("ours", ours))}
    assert "openmp" in apis["faiss"] and "openmp" not in apis["ours"]
    assert all(p["num_threads"] == 1 for r in (faiss, ours) for p in r["process"]["pools"])
    assert faiss["neighbours"] == ours["neighbours"]


def test_cpu_features_follow_proc_cpuinfo():
    from spade_edge.bench import speed

    info = Path("/proc/cpuinfo")
    line = next((x for x in info.read_text().splitlines() if x.startswith("flags")), None) if info.exists() else None
    if line is None:
        pytest.skip("no x86 flags in /proc/cpuinfo here")
    features = speed.cpu_features()
    assert features["avx2"] == ("avx2" in line.split(":", 1)[1].split())
    assert {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"} <= set(features)
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {}})
    flags_line = next(x for x in table.splitlines() if x.startswith("Instruction sets: "))
    present = flags_line.removeprefix("Instruction sets: ").split(" (not:")[0].split(";")[0].split()
    assert present == [name for name, on in features.items() if on]


def test_standalone_predict_runs_as_infer_would(tmp_path):
    """A row of the end-to-end table: a fresh process loads the model and the gallery, predicts."""
    from PIL import Image

    from spade_edge.bench import speed
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.codec import Storage
    from spade_edge.runtime.features import backend_from_model

    from .conftest import tiny_onnx

    tiny_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    images = []
    for i in range(6):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(100, 140, (32, 32), dtype=np.uint8)).save(images[-1])
    gallery_from_images(
        backend_from_model(tmp_path / "tiny.onnx"),
        images[:5],
        tmp_path / "g.gallery",
        holdout=0.0,
        show_progress=False,
        storage=Storage.exact(),
    )  # concat scores every pixel
    e = speed.in_fresh_process(
        "standalone_predict",
        1,
        model=str(tmp_path / "tiny.onnx"),
        gallery=str(tmp_path / "g.gallery"),
        image=str(images[5]),
        k=3,
        mode="concat",
        repeats=2,
    )
    assert e["process"]["pid"] != os.getpid() and not any(p["user_api"] == "openmp" for p in e["process"]["pools"])
    assert e["stages"]["total"] > 0 and e["first"]["total"] > 0 and e["load_s"] > 0
    table = speed.markdown(
        {"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {}, "end_to_end": {"concat": e}}
    )
    row = next(x for x in table.splitlines() if x.startswith("| concat |"))
    assert f"| {e['scorer']} |" in row and f"{e['first']['total']:.2f}" in row


def test_bench_speed_quick_prints_the_machine_and_the_scorers(tmp_path):
    from click.testing import CliRunner

    from spade_edge.bench import speed
    from spade_edge.cli import main
    from spade_edge.runtime.scoring import cpu_scorer

    res = CliRunner().invoke(
        main,
        ["bench", "speed", "--quick", "--shapes", "tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("Machine: "))
    assert lines[start + 1].startswith("Instruction sets: ")
    assert all(f in lines[start + 1] for f, on in speed.cpu_features().items() if on)
    assert "fresh Python process" in res.output and "threads: 1" in res.output
    row = next(x for x in lines if x.startswith("| tiny concat K=5"))
    assert f"; {cpu_scorer().name})" in row and "| - |" not in row  # the peers measured too
    assert f"scorer {cpu_scorer().name}" in res.output  # the profile's
    r = json.loads((tmp_path / "speed.json").read_text())
    pools = [p for proc in r["scoring"]["tiny concat K=5"]["processes"].values() for p in proc["pools"]]
    assert pools and all(p["num_threads"] == 1 for p in pools)
    assert (tmp_path / "speed.md").read_text() in res.output


@pytest.mark.parametrize("amx", ["1", "0"])
def test_concat_profile_accounts_for_the_whole_run(amx, monkeypatch):
    """Each part is measured (by the AMX scorer's clock or cProfile) and took time; together they fit
    in the run's wall clock and leave little of it to 'other'; the scorer named is the one whose
    stats show its path ran."""
    from spade_edge.bench import speed
    from spade_edge.runtime.scoring import cpu_scorer

    monkeypatch.setenv("SPADE_EDGE_AMX", amx)
    r = speed.profile_concat(k=3)
    assert r["path"] == _wide_pyramid_path(cpu_scorer())  # WRN50x2's shapes: the per-level path
    assert r["scorer"] == cpu_scorer().name
    if amx == "0":
        assert r["scorer"] != "amx"
    parts = dict(r["parts_s"])
    other = parts.pop(speed.OTHER)
    assert parts and all(v > 0 for v in parts.values()), parts
    measured = sum(parts.values())
    assert measured <= r["total_s"] * 1.02  # measured inside the run, not beside it
    assert other == pytest.approx(r["total_s"] - measured) and other < 0.25 * r["total_s"], r
    cprofiled = r["path"] == "fp32 levels"
    work = (
        parts["BLAS products, fine and coarse (8.1 GFLOP per gallery image)"]
        if cprofiled
        else next(v for k, v in parts.items() if " screen: " in k or k.startswith("kernel: "))  # the kernel's part
    )
    if cprofiled:
        assert work == max(parts.values())  # the products are the work; everything else is overhead
    else:
        assert work > 0
    parts[speed.OTHER] = other
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {}, "profile": r})
    assert sum(line.startswith(tuple(f"| {k}" for k in parts)) for line in table.splitlines()) == len(parts)


def test_fused_profile_accounts_for_the_whole_run():
    """The fused scorer's own clock on a narrow pyramid (Lite0's proportions, small): the kernel at
    per-level cost and the exact re-computation took time, and the parts leave little of the run to
    'other'."""
    from spade_edge.bench import speed
    from spade_edge.runtime.scoring import cpu_scorer
    from spade_edge.runtime.scoring.fused_levels import EXACT, KERNEL

    if not cpu_scorer().name.startswith("fused "):
        pytest.skip(f"the CPU scorer here is {cpu_scorer().name}, not a fused kernel")
    r = speed.profile_concat(k=4, backbone="narrow", shapes=[(24, 24, 24), (12, 12, 40), (6, 6, 112)])
    assert r["path"] == f"{r['scorer']} levels"  # the narrow pyramid at per-level cost in the fused kernel
    parts = dict(r["parts_s"])
    other = parts.pop(speed.OTHER)
    assert parts[KERNEL] > 0 and parts[EXACT] > 0
    assert sum(parts.values()) <= r["total_s"] * 1.02 and other < 0.25 * r["total_s"], r


def test_per_level_rows_agree_with_faiss_and_name_the_paths(monkeypatch):
    """A per-level row: ours, NumpyScorer and faiss in fresh processes on the same gallery (as stored
    by `gallery build`'s defaults: int8, a coreset), the same neighbours, every level's path named."""
    from spade_edge.bench import speed
    from spade_edge.runtime.scoring import cpu_scorer

    monkeypatch.setitem(speed.SHAPES, "tiny", [(12, 12, 24), (6, 6, 40), (3, 3, 112)])
    r = speed.per_level("tiny", 4, "default", repeats=1)
    assert r["scorer"] == cpu_scorer().name and len(r["paths"]) == 3 and all(r["paths"])
    assert r["rows"] == 4 * sum(-(-h * w // 5) for h, w, _ in speed.SHAPES["tiny"])  # a fifth of each image's cells
    assert r["same_neighbours_as_faiss"] == 1.0
    assert len({p["pid"] for p in r["processes"].values()} | {os.getpid()}) == 4
    table = speed.markdown(
        {"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {}, "per_level": {"tiny per-level": r}}
    )
    row = next(line for line in table.splitlines() if line.startswith("| tiny per-level"))
    assert r["scorer"] in row and f"{r['faiss_s'] / r['ours_s']:.2f}x" in row


def _wide_pyramid_path(scorer) -> str:
    """The path a wide pyramid (WRN50x2-like) takes with ``scorer``: the AMX screen, the bf16 pyramid
    screen of a fused scorer at level avx512bf16, else the fused kernel's per-level cost, or NumpyScorer's
    fp32 per-level products where no kernel runs."""
    if scorer.name == "amx":
        return "amx"
    screen = getattr(scorer, "pyramid_screen", lambda: None)()
    if screen is not None:
        return screen.name
    return f"{scorer.name} levels" if scorer.name.startswith("fused ") else "fp32 levels"
