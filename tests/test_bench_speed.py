"""`bench speed`'s scoring comparison on small shapes: the peers find the same neighbours as ours,
and the table reports the runtime's path."""
from __future__ import annotations

import pytest

pytest.importorskip("faiss", reason="the bench extra (faiss-cpu) is not installed")


def test_scoring_peers_agree_and_the_table_reports_them(monkeypatch):
    from spade_edge.bench import speed

    monkeypatch.setitem(speed.SHAPES, "tiny", [(12, 12, 40), (6, 6, 80), (3, 3, 160)])
    r = speed.scoring("tiny", 3, repeats=1)
    assert r["same_neighbours_as_faiss"] == 1.0
    assert r["gflop"] == pytest.approx(2 * 144 * 144 * 3 * 280 / 1e9)
    for key in ("ours_levels_s", "ours_s", "faiss_s", "torch_s", "numpy_s"):
        assert r[key] > 0
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {"tiny K=3": r}})
    row = next(line for line in table.splitlines() if line.startswith("| tiny K=3"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert float(cells[2]) == pytest.approx(r["ours_levels_s"], abs=0.006)  # 'ours' is the runtime's path
    assert cells[7] == f"{r['faiss_s'] / r['ours_levels_s']:.2f}x"


def test_concat_profile_accounts_for_the_whole_run():
    from spade_edge.bench import speed

    r = speed.profile_concat(k=3)
    parts = r["parts_s"]
    assert sum(parts.values()) == pytest.approx(r["total_s"])
    assert all(v >= 0 for v in parts.values())
    blas = next(v for k, v in parts.items() if k.startswith("BLAS"))
    assert blas == max(parts.values())  # the products are the work; everything else is overhead
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {}, "profile": r})
    assert sum(line.startswith(("| BLAS", "| native", "| selection", "| exact", "| gallery norms", "| other"))
               for line in table.splitlines()) == 6
