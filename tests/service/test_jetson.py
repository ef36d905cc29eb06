"""jetson/: the bench's numbers (tegrastats, power mode, percentiles), the scripts in dry-run and on
this machine, the unit's readiness protocol, and the linters."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess

import pytest

from spade_edge.bench.jetson import parse_tegrastats_line, percentiles, power_mode, summarize_tegrastats

from .conftest import ROOT, ServerProcess

JETSON = ROOT / "jetson"

ORIN_NANO = (
    "11-22-2026 08:00:00 RAM 2411/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [2%@729,1%@729,0%@729,9%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 37%@[305] "
    "NVDEC off NVJPG off VIC off OFA off APE 200 cpu@47.5C soc2@46.2C gpu@45.906C tj@48.1C "
    "VDD_IN 4736mW/4700mW VDD_CPU_GPU_CV 514mW/514mW VDD_SOC 1480mW/1480mW"
)
AGX_ORIN = (
    "RAM 5059/30623MB (lfb 5843x4MB) SWAP 0/15311MB (cached 0MB) CPU [15%@735,8%@853] EMC_FREQ 1%@2133 "
    "GR3D_FREQ 80%@[1300,1300] VIC_FREQ 729 APE 174 CV0@-256C CPU@47C GPU@45C "
    "VDD_GPU_SOC 6000mW/5000mW VDD_CPU_CV 1200mW/1100mW VIN_SYS_5V0 4000mW/3900mW VDDQ_VDD2_1V8AO 500mW/500mW"
)
NANO_JP4 = (
    "RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224,13%@1224,10%@1224] "
    "EMC_FREQ 0% GR3D_FREQ 0% PLL@21C CPU@25C GPU@23.5C POM_5V_IN 2545/2547 POM_5V_GPU 0/0 POM_5V_CPU 549/529"
)


def test_tegrastats_lines_of_three_board_families():
    a = parse_tegrastats_line(ORIN_NANO)
    assert a["ram_used_mb"] == 2411 and a["ram_total_mb"] == 7620 and a["swap_used_mb"] == 0
    assert a["gpu_load_pct"] == 37 and a["emc_load_pct"] == 0 and a["cpu_load_pct"] == 3.0
    assert a["power_mw"] == {"VDD_IN": 4736, "VDD_CPU_GPU_CV": 514, "VDD_SOC": 1480}
    assert a["temp_c"]["gpu"] == 45.906 and a["temp_c"]["tj"] == 48.1
    b = parse_tegrastats_line(AGX_ORIN)
    assert b["gpu_load_pct"] == 80 and b["power_mw"]["VIN_SYS_5V0"] == 4000 and "RAM" not in b["power_mw"]
    c = parse_tegrastats_line(NANO_JP4)
    assert c["power_mw"] == {"POM_5V_IN": 2545, "POM_5V_GPU": 0, "POM_5V_CPU": 549} and c["gpu_load_pct"] == 0
    assert parse_tegrastats_line("") is None


def test_tegrastats_summary_and_energy_per_image():
    lines = [
        ORIN_NANO,
        ORIN_NANO.replace("VDD_IN 4736mW", "VDD_IN 5264mW").replace("GR3D_FREQ 37%", "GR3D_FREQ 63%"),
        "junk",
    ]
    s = summarize_tegrastats(lines, seconds=2.0, images=10)
    assert s["samples"] == 2 and s["total_rail"] == "VDD_IN"
    assert s["power_mw"]["VDD_IN"] == {"mean": 5000.0, "max": 5264}
    assert s["gpu_load_pct"] == {"mean": 50.0, "max": 63}
    assert s["energy_per_image_mj"] == 1000.0  # 5 W x 2 s / 10 images = 1 J
    assert summarize_tegrastats(["x"])["available"] is False
    assert summarize_tegrastats([AGX_ORIN])["total_rail"] == "VIN_SYS_5V0"


def test_power_mode_and_percentiles():
    nv = "NV Power Mode: 15W\n0\n"
    clocks = (
        "SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Developer Kit\n"
        "cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400\n"
        "GPU MinFreq=624750000 MaxFreq=624750000 CurrentFreq=624750000\n"
        "EMC MinFreq=204000000 MaxFreq=2133000000 CurrentFreq=2133000000 FreqOverride=1\n"
    )
    p = power_mode(nv, clocks)
    assert p["mode"] == "15W" and p["mode_id"] == 0 and p["clocks_pinned"] is True
    assert power_mode(nv, clocks.replace("MinFreq=1510400", "MinFreq=729600"))["clocks_pinned"] is False
    assert power_mode(None, None) == {"nvpmodel": None, "jetson_clocks": None}
    q = percentiles([float(i) for i in range(1, 101)])
    assert q["n"] == 100 and q["p50"] == 50.5 and q["p99"] == pytest.approx(99.01) and q["max"] == 100.0


def _fake_tool(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_bench_script_on_this_machine_with_and_without_jetson_tools(assets, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, p in assets["images"].items():
        shutil.copy(p, images / name)
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv/bin/python"))}
    if not os.path.exists(env["PYTHON"]):
        env["PYTHON"] = "python3"
    base = [
        "bash",
        str(JETSON / "bench.sh"),
        "-m",
        str(assets["model"]),
        "-g",
        str(assets["gallery_a"]),
        "-i",
        str(images),
        "--device",
        "cpu",
        "--repeat",
        "20",
        "--warmup",
        "2",
    ]
    fakes = {
        "TEGRASTATS": _fake_tool(tmp_path / "tegrastats", f"while true; do echo '{ORIN_NANO}'; sleep 0.05; done\n"),
        "NVPMODEL": _fake_tool(tmp_path / "nvpmodel", "echo 'NV Power Mode: MAXN_SUPER'; echo 2\n"),
        "JETSON_CLOCKS": _fake_tool(tmp_path / "jetson_clocks", "echo 'GPU MinFreq=1 MaxFreq=1 CurrentFreq=1'\n"),
    }
    out = tmp_path / "with.json"
    r = subprocess.run(
        base + ["-o", str(out)],
        env={**env, **{k: str(v) for k, v in fakes.items()}},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    lat = res["latency_ms"]
    assert lat["n"] == 20 * len(assets["images"]) and lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert res["power"]["mode"] == "MAXN_SUPER" and res["power"]["clocks_pinned"] is True
    teg = res["tegrastats"]
    assert teg["available"] and teg["samples"] >= 1 and teg["power_mw"]["VDD_IN"]["max"] == 4736
    assert teg["gpu_load_pct"]["max"] == 37 and teg["ram_used_mb"]["max"] == 2411
    assert set(res["verdicts"]) <= {"OK", "NOT_OK"} and res["throughput_img_s"] > 0

    out = tmp_path / "without.json"
    plain = {**env, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(base + ["-o", str(out)], env=plain, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["tegrastats"] == {"available": False, "reason": "tegrastats not found (not a Jetson?)"}
    assert "not found" in res["power"]["nvpmodel"] and res["latency_ms"]["n"] > 0


def test_install_script_dry_run_plans():
    def plan(*args):
        return subprocess.run(
            ["bash", str(JETSON / "install.sh"), "--dry-run", *args], capture_output=True, text=True, timeout=60
        )

    r = plan(
        "--jetpack", "6", "--model", "m.onnx", "--gallery", "p.gallery", "--with-pycuda", "--build-engine", "--", "fp16"
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for step in (
        "python3 -m venv --system-site-packages /opt/spade-edge/venv",
        "jp6/cu126 onnxruntime-gpu",
        "cupy-cuda12x",
        "--no-binary pycuda",
        "useradd --system",
        "/usr/sbin/nologin",
        "build-engine.sh /var/lib/spade-edge/model.onnx /var/lib/spade-edge/model.engine fp16",
        "SPADE_EDGE_MODEL=/var/lib/spade-edge/model.engine",
        "systemctl enable spade-edge.service",
        "systemctl restart spade-edge.service",
    ):
        assert step in out, step
    r = plan("--jetpack", "7")
    assert r.returncode == 0 and "cupy-cuda13x" in r.stdout and "cu130" in r.stdout and "restart" not in r.stdout
    r = plan("--cpu-only", "--no-service")
    assert (
        r.returncode == 0
        and "onnxruntime>=1.17" in r.stdout
        and "cupy" not in r.stdout
        and "+ systemctl" not in r.stdout
    )
    if not os.path.exists("/etc/nv_tegra_release"):
        r = plan()
        assert r.returncode == 2 and "not a Jetson" in r.stderr
    r = plan("--jetpack", "6", "--build-engine")
    assert r.returncode == 2 and "--build-engine needs --model" in r.stderr


@pytest.mark.parametrize(
    "soc, jetpack, outcome",
    [
        ("tegra234", "6", "GPU Orin (sm_87)"),
        ("tegra264", "7", "GPU Thor (sm_110)"),
        ("tegra234", "7", "holds Thor (sm_110) wheels"),
        ("tegra264", "6", "Thor needs JetPack 7"),
        ("tegra194", "6", "JetPack 5 or older (Python 3.8, TensorRT 8.5)"),
    ],
)
def test_install_script_checks_the_boards_gpu_against_the_wheels(tmp_path, soc, jetpack, outcome):
    compatible = tmp_path / "compatible"  # as /proc/device-tree/compatible lists it: NUL-separated
    compatible.write_bytes(f"nvidia,p3768-0000+p3767-0005\0nvidia,{soc}\0".encode())
    r = subprocess.run(
        ["bash", str(JETSON / "install.sh"), "--dry-run", "--jetpack", jetpack],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JETSON_COMPATIBLE": str(compatible)},
    )
    assert outcome in (r.stdout if outcome.startswith("GPU") else r.stderr)
    assert r.returncode == (0 if outcome.startswith("GPU") else 2)


def test_unit_runs_unprivileged_restarts_and_waits_for_readiness():
    unit = (JETSON / "spade-edge.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["Type"] == "notify" and keys["Restart"] == "on-failure"
    assert keys["User"] not in ("root", "0") and keys["NoNewPrivileges"] == "yes"
    assert "serve" in keys["ExecStart"] and keys["ExecReload"].startswith("/bin/kill -HUP")
    assert int(keys["WatchdogSec"]) > 60


def test_service_tells_systemd_when_ready(assets, tmp_path):
    """Type=notify: READY=1 reaches NOTIFY_SOCKET only after the load and warm-up; then watchdog pings."""
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        s.settimeout(60)
        srv = ServerProcess(
            assets["model"],
            assets["gallery_a"],
            tmp_path,
            env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000"},
        )
        try:
            msg = s.recv(4096).decode()
            assert msg.startswith("READY=1") and "STATUS=serving tiny.onnx" in msg
            assert srv.wait_ready()["generation"] == 1
            assert s.recv(4096).decode() == "WATCHDOG=1"  # pinged while the worker is healthy
        finally:
            assert srv.stop() == 0
        msgs = []
        while "STOPPING=1" not in msgs:
            msgs.append(s.recv(4096).decode())


def _lint_tools_missing() -> list[str]:
    venv = ROOT / ".venv/bin"
    return [
        t for t in ("shellcheck", "hadolint", "systemd-analyze") if shutil.which(t) is None and not (venv / t).exists()
    ]


@pytest.mark.skipif(bool(_lint_tools_missing()), reason=f"lint tools not installed: {_lint_tools_missing()}")
def test_lint_script_passes_here_and_catches_findings(tmp_path):
    r = subprocess.run(["bash", str(JETSON / "lint.sh")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.sh").write_text("#!/bin/bash\ncd $1\n")
    (bad / "Dockerfile").write_text("FROM ubuntu\nRUN apt-get install curl\n")
    (bad / "x.service").write_text("[Service]\nExecStart=/bin/true\nRestart=sometimes\n")
    r = subprocess.run(["bash", str(JETSON / "lint.sh"), str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "SC2086" in r.stdout and "DL3008" in r.stdout and "restart specifier" in r.stderr
