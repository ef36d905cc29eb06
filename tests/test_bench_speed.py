"""`bench speed`'s scoring comparison on small shapes: the peers find the same neighbours as ours,
and the table reports the runtime's path; the profile accounts for the whole run."""
from __future__ import annotations

import pytest

pytest.importorskip("faiss", reason="the bench extra (faiss-cpu) is not installed")


def test_scoring_peers_agree_and_the_table_reports_them(monkeypatch):
    from spade_edge.bench import speed
    from spade_edge.runtime.scoring import scorer_for

    monkeypatch.setitem(speed.SHAPES, "tiny", [(12, 12, 40), (6, 6, 80), (3, 3, 160)])
    r = speed.scoring("tiny", 3, repeats=1)
    assert r["scorer"] == scorer_for("cpu").name
    assert r["same_neighbours_as_faiss"] == 1.0 and r["same_neighbours_as_fp32"] == 1.0
    assert r["gflop"] == pytest.approx(2 * 144 * 144 * 3 * 280 / 1e9)
    for key in ("ours_levels_s", "fp32_levels_s", "ours_s", "faiss_s", "torch_s", "numpy_s"):
        assert r[key] > 0
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {"tiny K=3": r}})
    row = next(line for line in table.splitlines() if line.startswith("| tiny K=3"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert r["scorer"] in cells[0]
    assert float(cells[2]) == pytest.approx(r["ours_levels_s"], abs=0.006)  # 'ours' is the runtime's path
    assert cells[8] == f"{r['faiss_s'] / r['ours_levels_s']:.2f}x"


@pytest.mark.parametrize("amx", ["1", "0"])
def test_concat_profile_accounts_for_the_whole_run(amx, monkeypatch):
    from spade_edge.bench import speed
    from spade_edge.runtime.scoring import scorer_for

    monkeypatch.setenv("SPADE_EDGE_AMX", amx)
    r = speed.profile_concat(k=3)
    assert r["scorer"] == scorer_for("cpu").name
    parts = r["parts_s"]
    assert sum(parts.values()) == pytest.approx(r["total_s"])
    assert all(v >= -1e-3 for v in parts.values())
    work = next(v for k, v in parts.items() if k.startswith(("BLAS", "AMX screen")))
    if amx == "0":
        assert work == max(parts.values())  # the products are the work; everything else is overhead
    else:
        assert work > 0
    table = speed.markdown({"machine": speed.machine(), "gemm_gflops": 100.0, "scoring": {}, "profile": r})
    assert sum(line.startswith(tuple(f"| {k}" for k in parts)) for line in table.splitlines()) == len(parts)
