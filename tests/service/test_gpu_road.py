"""The Jetson road end to end, without a GPU (DESIGN.md section 4).

The GPU packages are replaced at the import boundary by tests/standins: CuPy on numpy (the CUDA
kernel compiled as C++), TensorRT whose engines run the ONNX model through ONNX Runtime on the CPU,
pycuda, trtexec; ONNX Runtime's GPU providers by sessions that compute on the CPU and report what
they were asked for (or, to test the refusal, that they fell back). The stand-ins keep CUDA's rules
(device and context current per thread, memory owned by a device), so wiring that would fail on a
Jetson fails here. What they cannot show is GPU speed or GPU numerics: that needs a GPU
(tests/gpu, jetson/bench.sh).

Proven here: every documented device value loads a Detector from an ONNX model and from a TensorRT
engine and gives the CPU path's maps and verdicts from a worker thread; 'auto' records what it
could not have; a device asked for by name is obtained or refused; the engine that
jetson/build-engine.sh builds (the step of install.sh --build-engine) is served by the exact
command line of the systemd unit with the settings install.sh writes, and answers /inspect from
the service's worker thread; the Dockerfile's command and bench.sh's run start too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from spade_edge.runtime import Detector
from spade_edge.runtime.device import DEVICES
from spade_edge.runtime.errors import ModelError
from spade_edge.runtime.scoring import cpu_scorer

from ..standins import TRTEXEC, standins_env, use_ort_gpu_providers, use_standins
from .conftest import ROOT, ServerProcess, request

JETSON = ROOT / "jetson"
# every form `--device` documents (auto|cpu|cuda[:N]|tensorrt[:N]), GPU 1 included
DEVICE_VALUES = ("auto", "cpu", "cuda", "cuda:1", "tensorrt", "tensorrt:1")
CPU_SCORER = cpu_scorer().name  # what scores on the CPU here: AMX, a fused kernel's level, or numpy
BIN = Path(sys.executable).parent


def test_the_device_values_cover_every_documented_form():
    from spade_edge.options import DeviceType

    assert {v.split(":")[0] for v in DEVICE_VALUES} == set(DEVICES)
    assert DeviceType.name == "auto|cpu|cuda[:N]|tensorrt[:N]"


@pytest.fixture(scope="module")
def reference(assets):
    """The CPU path's predictions of every test image: what each device must reproduce."""
    det = Detector.load(assets["model"], assets["gallery_a"], device="cpu")
    return {name: det.predict(path) for name, path in assets["images"].items()}


def _in_worker(fn):
    """``fn()`` on a thread of its own, as the service's worker runs inference."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _same_as_cpu(det, assets, reference):
    for name, path in assets["images"].items():
        p = _in_worker(lambda: det.predict(path))  # noqa: B023 - run and joined in this iteration
        want = reference[name]
        assert p.verdict == want.verdict, name
        np.testing.assert_allclose(p.anomaly_map, want.anomaly_map, rtol=1e-4, atol=1e-6, err_msg=name)
        assert p.score == pytest.approx(want.score, rel=1e-4), name
        assert [c for c in p.correspondence.image.ravel()] == [c for c in want.correspondence.image.ravel()]


def _engine(assets, tmp_path) -> Path:
    """The tiny model's engine, built by the project's builder on the stand-ins (in use)."""
    from spade_edge.export.engine import engine_from_onnx

    return engine_from_onnx(assets["model"], tmp_path / "tiny.engine", "fp32", max_batch=4, workspace_mb=64)


@pytest.mark.parametrize("kind", ["onnx", "engine"])
@pytest.mark.parametrize("device", DEVICE_VALUES)
def test_every_device_value_loads_a_detector_that_scores_like_the_cpu(
    assets, reference, tmp_path, monkeypatch, kind, device
):
    use_standins(monkeypatch, gpus=2)
    use_ort_gpu_providers(monkeypatch)
    model = assets["model"] if kind == "onnx" else _engine(assets, tmp_path)
    if kind == "engine" and device == "cpu":
        with pytest.raises(ModelError, match="a TensorRT engine runs on an NVIDIA GPU"):
            Detector.load(model, assets["gallery_a"], device=device)
        return
    det = Detector.load(model, assets["gallery_a"], device=device)
    gpu = device != "cpu"
    assert det.scorer.name == ("cuda" if gpu else CPU_SCORER), det.device
    if kind == "engine":
        assert det.backend.name == "tensorrt" and "TensorRT engine tiny.engine" in det.device
    elif gpu:
        want = {"cuda": "CUDAExecutionProvider"}.get(device.split(":")[0], "TensorrtExecutionProvider")
        assert det.backend.name == "onnxruntime" and want in det.device
    assert ("device 1" in det.device) == device.endswith(":1"), det.device
    _same_as_cpu(det, assets, reference)
    _in_worker(det.close)  # released from another thread than the one that loaded it


@pytest.mark.parametrize("device", ["tensorrt", "tensorrt:1"])
def test_an_engine_on_pycuda_where_cupy_is_absent(assets, reference, tmp_path, monkeypatch, device):
    """pycuda carries the engine's memory; without CuPy the features come back to the host and are
    scored on the CPU, which the placement says."""
    use_standins(monkeypatch, gpus=2, cupy=False)
    det = Detector.load(_engine(assets, tmp_path), assets["gallery_a"], device=device)
    assert det.backend.name == "tensorrt" and det.scorer.name == CPU_SCORER
    assert "on the CPU (CuPy is not installed" in det.device, det.device
    _same_as_cpu(det, assets, reference)
    _in_worker(det.close)


def test_a_device_asked_for_is_obtained_or_refused_and_auto_says_what_it_missed(assets, tmp_path, monkeypatch):
    use_standins(monkeypatch, gpus=1)
    use_ort_gpu_providers(monkeypatch, starts=False)  # compiled in, but the CUDA libraries did not load
    for device in ("cuda", "tensorrt"):
        with pytest.raises(ModelError, match="could not start its .*ExecutionProvider.*the session runs on CPU"):
            Detector.load(assets["model"], assets["gallery_a"], device=device)
    det = Detector.load(assets["model"], assets["gallery_a"], device="auto")
    assert det.backend.device == "cpu" and det.scorer.name == CPU_SCORER
    assert "tensorrt: " in det.fallback and "cuda: " in det.fallback and "could not start" in det.fallback
    with pytest.raises(
        ModelError, match=r"needs CUDA device 3: no usable CUDA device 3 \(CuPy: .*invalid device ordinal"
    ):
        Detector.load(assets["model"], assets["gallery_a"], device="cuda:3")


def test_no_usable_gpu(assets, tmp_path, monkeypatch):
    use_standins(monkeypatch, gpus=1)
    engine = _engine(assets, tmp_path)
    use_standins(monkeypatch, gpus=0)  # the driver answers, no device
    use_ort_gpu_providers(monkeypatch)
    det = Detector.load(assets["model"], assets["gallery_a"], device="auto")
    assert det.backend.device == "cpu" and "no usable CUDA device" in det.fallback
    for device in ("auto", "tensorrt"):
        with pytest.raises(ModelError, match=r"tiny.engine \(a TensorRT engine\) needs CUDA device 0: no usable CUDA"):
            Detector.load(engine, assets["gallery_a"], device=device)


def test_tensorrt_provider_gets_fp16_an_engine_cache_beside_the_model_and_the_device(assets, tmp_path, monkeypatch):
    use_standins(monkeypatch, gpus=2)
    made = use_ort_gpu_providers(monkeypatch)
    model = tmp_path / "m.onnx"
    model.write_bytes(Path(assets["model"]).read_bytes())
    for _ in range(2):  # a start and a restart: the same cache, so the second builds nothing
        Detector.load(model, assets["gallery_a"], device="tensorrt:1", fp16=True).close()
    (first, second) = [m[0] for m in made]
    assert first == second and first[0] == "TensorrtExecutionProvider"
    opts = first[1]
    assert opts["device_id"] == 1 and opts["trt_fp16_enable"] is True and opts["trt_engine_cache_enable"] is True
    assert Path(opts["trt_engine_cache_path"]) == tmp_path / "m.onnx.trt-cache"
    assert made[0][1] == ("CUDAExecutionProvider", {"device_id": 1}) and made[0][-1] == "CPUExecutionProvider"


def test_infer_command_on_an_engine(assets, reference, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from spade_edge.cli import main

    use_standins(monkeypatch)
    engine = _engine(assets, tmp_path)
    path = assets["images"]["bright.png"]
    r = CliRunner().invoke(
        main, ["infer", "-m", str(engine), "-g", str(assets["gallery_a"]), str(path), "--device", "tensorrt"]
    )
    assert r.exit_code == 0, r.output
    line = json.loads([x for x in r.output.splitlines() if x.startswith("{")][0])
    assert line["verdict"] == reference["bright.png"].verdict
    assert line["score"] == pytest.approx(reference["bright.png"].score, rel=1e-4)


def test_devices_command_says_what_the_machine_offers_and_where_a_model_runs(assets, tmp_path, monkeypatch):
    use_standins(monkeypatch)
    engine = _engine(assets, tmp_path)
    r = subprocess.run(
        [str(BIN / "spade-edge"), "devices", "-m", str(engine)],
        capture_output=True,
        text=True,
        env=standins_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "gpu 0: Stand-in GPU (numpy) (compute capability 8.7)" in r.stdout and "cupy: usable" in r.stdout
    assert f"{engine} on --device auto: TensorRT engine tiny.engine on Stand-in GPU" in r.stdout


# ---------------------------------------------------------------------------- the Jetson kit's command lines


def _installed_settings(tmp_path) -> dict:
    """/etc/default/spade-edge as ``install.sh --build-engine`` writes it (read from its dry run)."""
    r = subprocess.run(
        [
            "bash",
            str(JETSON / "install.sh"),
            "--dry-run",
            "--jetpack",
            "6",
            "--model",
            "m.onnx",
            "--gallery",
            "p.gallery",
            "--build-engine",
            "--",
            "fp16",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    block = r.stdout.split("+ write /etc/default/spade-edge:\n", 1)[1]
    settings = dict(line.split("=", 1) for line in block.splitlines() if re.match(r"^SPADE_EDGE_\w+=", line))
    assert settings["SPADE_EDGE_MODEL"] == "/var/lib/spade-edge/model.engine"
    assert settings["SPADE_EDGE_DEVICE"] == "tensorrt"
    return settings


def _unit_command(settings: dict) -> list[str]:
    """The unit's ExecStart, expanded as systemd does (${X}: one word, $X: split at whitespace), with
    the installed venv's spade-edge replaced by this one's."""
    unit = (JETSON / "spade-edge.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    words = []
    for word in shlex.split(exec_start):
        if re.fullmatch(r"\$\w+", word):
            words += settings.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: settings[m.group(1)], word))
    assert words[0] == "/opt/spade-edge/venv/bin/spade-edge"
    return [str(BIN / "spade-edge"), *words[1:]]


def test_unit_serves_the_engine_that_install_builds(assets, reference, tmp_path):
    """install.sh --build-engine: jetson/build-engine.sh (trtexec stand-in) builds the engine and its
    sidecar; the unit's ExecStart, with the settings install.sh writes, serves it; /inspect is
    answered from the service's worker thread, with the CUDA scorer, as the CPU path answers."""
    state = tmp_path / "var-lib-spade-edge"
    state.mkdir()
    (state / "model.onnx").write_bytes(Path(assets["model"]).read_bytes())
    (state / "parts.gallery").write_bytes(Path(assets["gallery_a"]).read_bytes())
    env = standins_env({**os.environ, "PYTHON": sys.executable, "TRTEXEC": str(TRTEXEC)})
    build = subprocess.run(
        ["bash", str(JETSON / "build-engine.sh"), str(state / "model.onnx"), str(state / "model.engine"), "fp16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert json.loads((state / "model.engine.json").read_text())["build"]["tool"] == "trtexec"

    settings = {k: v.replace("/var/lib/spade-edge", str(state)) for k, v in _installed_settings(tmp_path).items()}
    settings.update(SPADE_EDGE_HOST="127.0.0.1", SPADE_EDGE_PORT="0")  # loopback, any free port: a test machine
    srv = ServerProcess(None, None, tmp_path, env=env, command=_unit_command(settings))
    try:
        health = srv.wait_ready()
        assert health["scorer"] == "cuda" and "TensorRT engine model.engine" in health["device"], health
        for name in ("bright.png", "normal0.png"):
            status, _, body = request(
                srv.url, "POST", f"/inspect?name={name}", body=Path(assets["images"][name]).read_bytes()
            )
            assert status == 200, body
            result = json.loads(body)
            assert result["verdict"] == reference[name].verdict
            assert result["score"] == pytest.approx(reference[name].score, rel=1e-3)
        status, _, body = request(srv.url, "POST", "/reload")  # the old generation is closed, the new serves
        assert status == 200 and json.loads(body)["generation"] == 2, body
        status, _, _ = request(
            srv.url, "POST", "/inspect?name=x.png", body=Path(assets["images"]["gray.png"]).read_bytes()
        )
        assert status == 200
    finally:
        assert srv.stop() == 0, srv.log.read_text()


def test_dockerfile_command_starts_and_says_why_it_runs_on_the_cpu(assets, tmp_path):
    """The image's CMD (an ONNX model, --device auto) on a machine whose onnxruntime has no GPU
    provider: it serves on the CPU and /health says why."""
    docker = (JETSON / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", docker, re.M).group(1))
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", docker, re.M).group(1))
    data = tmp_path / "data"
    data.mkdir()
    (data / "model.onnx").write_bytes(Path(assets["model"]).read_bytes())
    (data / "parts.gallery").write_bytes(Path(assets["gallery_a"]).read_bytes())
    words = [w.replace("/data", str(data)) for w in entry + cmd]
    words[words.index("--port") + 1], words[words.index("--host") + 1] = "0", "127.0.0.1"
    assert words[0] == "spade-edge" and "--device" in words and words[words.index("--device") + 1] == "auto"
    srv = ServerProcess(None, None, tmp_path, env=standins_env(), command=[str(BIN / "spade-edge"), *words[1:]])
    try:
        health = srv.wait_ready()
        assert health["device_fallback"] == "this onnxruntime has no GPU provider", health
        status, _, _ = request(
            srv.url, "POST", "/inspect?name=n.png", body=Path(assets["images"]["normal1.png"]).read_bytes()
        )
        assert status == 200
    finally:
        assert srv.stop() == 0


def test_bench_script_on_an_engine(assets, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, p in list(assets["images"].items())[:3]:
        (images / name).write_bytes(Path(p).read_bytes())
    env = standins_env({**os.environ, "PYTHON": sys.executable, "TRTEXEC": str(TRTEXEC)})
    model = tmp_path / "m.onnx"
    model.write_bytes(Path(assets["model"]).read_bytes())
    build = subprocess.run(
        ["bash", str(JETSON / "build-engine.sh"), str(model), str(tmp_path / "m.engine")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            "bash",
            str(JETSON / "bench.sh"),
            "-m",
            str(tmp_path / "m.engine"),
            "-g",
            str(assets["gallery_a"]),
            "-i",
            str(images),
            "-o",
            str(out),
            "--repeat",
            "3",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**env, "PATH": f"{BIN}:/usr/bin:/bin"},
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["latency_ms"]["n"] == 9 and res["scorer"] == "cuda", res
    assert res["device"] == "auto" and "TensorRT engine m.engine" in res["ran_on"]
