"""The TensorRT glue against the real TensorRT Python API, without a GPU (GPU-PACKAGES.md).

The bindings install from PyPI (``tensorrt-cu12-bindings``, ``tensorrt-cu13-bindings``); their
``libnvinfer*`` libraries do not. Three stub libraries exporting the nine C entry points the
bindings link against (each returning NULL/0) make ``import tensorrt`` work in a subprocess: good
for checking that every TensorRT name the code uses exists in that version, and nothing more:
``trt.Builder`` must fail with them, and does.

Where the bindings are looked for: the current environment, every folder under
``<venv>/tensorrt-api/`` (one ``pip install --target`` per version: two versions of the same
module cannot share an environment), and the folders in ``SPADE_EDGE_TRT_SITES`` (os.pathsep).
The test setup installs them so (10.3 is JetPack 6's; its ``tensorrt`` wrapper on PyPI is an sdist
that downloads, so that folder holds the bindings alone, imported as ``tensorrt_bindings``)::

    pip install --target .venv/tensorrt-api/10.3 tensorrt-cu12-bindings==10.3.0
    pip install --target .venv/tensorrt-api/10.16 tensorrt-cu12-bindings==10.16.1.11
    pip install --no-deps --target .venv/tensorrt-api/10.16 tensorrt-cu12==10.16.1.11
    pip install --target .venv/tensorrt-api/11.4 tensorrt-cu13-bindings==11.4.0.106
    pip install --no-deps --target .venv/tensorrt-api/11.4 tensorrt-cu13==11.4.0.106

The plain tests below (trtexec command lines, sidecar checks, version routing) run everywhere, and
so does the glue on the GPU stand-ins (tests/standins): what the builder is handed, read back from
the engine it built, and the runtime backend running that engine.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from spade_edge.cli import main as cli
from spade_edge.export import engine as eng
from spade_edge.export import trt_plans as plans
from spade_edge.export.trtexec import trtexec_args, trtexec_command
from spade_edge.runtime import engine_record as record
from spade_edge.runtime.engine_record import EngineError
from spade_edge.runtime.errors import ModelError
from spade_edge.runtime.modelinfo import onnx_metadata

from ..conftest import tiny_onnx
from ..standins import use_standins

ROOT = Path(__file__).resolve().parents[2]
# where TensorRT is called: the build, the engine record (version, logger), the runtime backend
SOURCES = (
    ROOT / "export" / "engine.py",
    ROOT / "runtime" / "engine_record.py",
    ROOT / "runtime" / "features" / "tensorrt.py",
)
STUB_SYMBOLS = {  # library -> entry points the bindings link against
    "libnvinfer": (
        "createInferBuilder_INTERNAL",
        "createInferRefitter_INTERNAL",
        "createInferRuntime_INTERNAL",
        "getBuilderPluginRegistry",
        "getPluginRegistry",
    ),
    "libnvinfer_plugin": ("initLibNvInferPlugins",),
    "libnvonnxparser": ("createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getNvOnnxParserVersion"),
}


# ---------------------------------------------------------------------------- finding the bindings


def _bindings_in(paths: list[str] | None) -> list[str]:
    versions = []
    for dist in importlib.metadata.distributions(**({"path": paths} if paths is not None else {})):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("tensorrt") and name.endswith("-bindings"):
            versions.append(dist.version)
    return versions


def trt_installs() -> list[tuple[str, str | None]]:
    """(version, folder to put on PYTHONPATH, or None for this environment) of each binding found."""
    found = [(v, None) for v in _bindings_in(None)]
    roots = [p for p in os.environ.get("SPADE_EDGE_TRT_SITES", "").split(os.pathsep) if p]
    sites = Path(sys.prefix) / "tensorrt-api"
    roots += [str(p) for p in sorted(sites.iterdir()) if p.is_dir()] if sites.is_dir() else []
    for root in roots:
        found += [(v, root) for v in _bindings_in([root])]
    return found


INSTALLS = trt_installs()
_MAJORS = {v.split(".")[0] for v, _ in INSTALLS}
_PARAMS = [pytest.param(v, site, id=f"trt{v}") for v, site in INSTALLS] + [
    pytest.param(None, major, id=f"trt{major}-not-installed") for major in ("10", "11") if major not in _MAJORS
]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """Stub libnvinfer.so.N, libnvinfer_plugin.so.N, libnvonnxparser.so.N for N = 10, 11."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the stub TensorRT libraries")
    root = tmp_path_factory.mktemp("trt-stubs")
    for major in ("10", "11"):
        (root / major).mkdir()
        for lib, symbols in STUB_SYMBOLS.items():
            src = root / f"{lib}.c"
            src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
            so = f"{lib}.so.{major}"
            subprocess.run(
                [gcc, "-shared", "-fPIC", f"-Wl,-soname,{so}", "-o", str(root / major / so), str(src)],
                check=True,
                capture_output=True,
            )
    return root


PROBE = r"""
import json, sys
names, onnx_path, out, module = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if module == "tensorrt":
    import tensorrt as trt
else:  # a bindings-only install (10.3: its 'tensorrt' wrapper on PyPI is an sdist that downloads)
    import tensorrt_bindings as trt
    sys.modules["tensorrt"] = trt  # the wrapper is 'from tensorrt_bindings import *' and nothing more

def exists(dotted):
    obj = trt
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True

members = sorted({m for obj in vars(trt).values() if isinstance(obj, type) for m in dir(obj) if not m.startswith("_")})
from spade_edge.export.engine import engine_from_onnx
from spade_edge.runtime.engine_record import make_logger
logger = make_logger(trt)  # the project's ILogger subclass, built on the real base class
try:
    trt.Builder(logger)
    builder = "created"
except Exception as exc:
    builder = f"{type(exc).__name__}: {exc}"
try:
    engine_from_onnx(onnx_path, out)
    build = "built"
except Exception as exc:
    build = f"{type(exc).__name__}: {exc}"
print(json.dumps({"version": trt.__version__, "present": {n: exists(n) for n in names}, "members": members,
                  "builder": builder, "build": build}))
"""


def probe(version, site, stubs, tmp_path) -> dict:
    if version is None:
        pytest.skip(
            f"no TensorRT {site}.x Python bindings found (this environment, {Path(sys.prefix) / 'tensorrt-api'}, "
            f"SPADE_EDGE_TRT_SITES); see the module docstring for the pip lines"
        )
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model, size=224)
    env = dict(os.environ, LD_LIBRARY_PATH=str(stubs / version.split(".")[0]))
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])
    names = list(plans.TRT_NAMES + plans.TRT10_NAMES + plans.TRT11_NAMES)
    module = "tensorrt" if site is None or (Path(site) / "tensorrt").is_dir() else "tensorrt_bindings"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(names), str(model), str(tmp_path / "x.engine"), module],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version, site", _PARAMS)
def test_every_tensorrt_name_exists_in_its_version(version, site, stubs, tmp_path):
    result = probe(version, site, stubs, tmp_path)
    assert result["version"] == version
    major = int(version.split(".")[0])
    own, other = (plans.TRT11_NAMES, plans.TRT10_NAMES) if major >= 11 else (plans.TRT10_NAMES, plans.TRT11_NAMES)
    missing = [n for n in plans.TRT_NAMES + own if not result["present"][n]]
    assert not missing, f"TensorRT {version} lacks {missing}"
    print(
        f"TensorRT {version}: all {len(plans.TRT_NAMES + own)} names present; names of the other version's path "
        f"present here: {[n for n in other if result['present'][n]]}"
    )
    # nothing is faked: without libnvinfer's real code no builder can be made
    assert "nullptr" in result["builder"], result["builder"]
    # and engine_from_onnx reaches TensorRT through its version's plan, then says what is wrong
    assert result["build"].startswith("EngineError: TensorRT could not create a builder"), result["build"]


@pytest.mark.parametrize("version, site", _PARAMS)
def test_code_uses_only_declared_tensorrt_names(version, site, stubs, tmp_path):
    """Each ``trt.X.Y`` in the code is declared; each method called on an object in the TensorRT
    functions that is a member of some TensorRT class is declared as one."""
    members = set(probe(version, site, stubs, tmp_path)["members"])
    declared = set(plans.TRT_NAMES + plans.TRT10_NAMES + plans.TRT11_NAMES)
    declared_members = {n.split(".")[-1] for n in declared}
    chains, attrs = _tensorrt_usage()
    assert chains and not chains - declared, f"undeclared TensorRT names: {sorted(chains - declared)}"
    # attribute names of our own objects (pathlib, ModelInfo, onnx, CuPy) that happen to be TensorRT member names too
    ours = {
        "name",
        "engine",
        "errors",
        "shape",
        "dtype",
        "handle",
        "stream",
        "context",
        "major",
        "precision",
        "append",
        "itemsize",
        "nbytes",
    }
    undeclared = (attrs & members) - declared_members - ours
    assert not undeclared, f"methods called on TensorRT objects but not declared: {sorted(undeclared)}"


def _tensorrt_usage() -> tuple[set[str], set[str]]:
    """(``trt.`` chains, other attribute names) in the functions of SOURCES that take TensorRT objects."""
    chains, attrs = set(), set()
    functions = {"engine_from_onnx", "make_logger", "tensorrt_version", "__init__", "_open", "_run"}
    modules = {"logging", "np", "os", "json", "sys", "ctypes"}  # attributes of these are not TensorRT's
    for path in SOURCES:
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or fn.name not in functions:
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute):
                    parts, base = [node.attr], node.value
                    while isinstance(base, ast.Attribute):
                        parts.insert(0, base.attr)
                        base = base.value
                    if isinstance(base, ast.Name) and base.id == "trt":
                        chains.add(".".join(p for p in parts if p == "__version__" or not p.startswith("__")))
                    elif not node.attr.startswith("_") and not (isinstance(base, ast.Name) and base.id in modules):
                        attrs.add(node.attr)
    chains.discard("")
    # a chain's prefixes are reached too ("MemoryPoolType.WORKSPACE" -> "MemoryPoolType"): keep the longest only
    return {c for c in chains if not any(o.startswith(c + ".") for o in chains)}, attrs


def test_version_specific_names_are_reached_only_through_their_plan():
    """TRT10_NAMES / TRT11_NAMES appear in the code only as the strings a plan returns."""
    texts = [path.read_text() for path in SOURCES]
    for name in plans.TRT10_NAMES + plans.TRT11_NAMES:
        assert not [t for t in texts if f"trt.{name}" in t], name
    for precision, model in (("fp32", "fp32"), ("fp16", "fp32"), ("fp16", "fp16"), ("int8", "int8")):
        p10 = plans.build_plan(precision, model, version=FakeVersion(10, 3))
        assert set(p10.network_flags + p10.builder_flags) <= set(plans.TRT10_NAMES)
    for precision in plans.PRECISIONS:
        p11 = plans.build_plan(precision, precision, version=FakeVersion(11, 4))
        assert set(p11.network_flags + p11.builder_flags) <= set(plans.TRT11_NAMES)


# ---------------------------------------------------------------------------- plain tests


@dataclasses.dataclass(frozen=True)
class FakeVersion:
    major: int
    minor: int = 0

    def __str__(self):
        return f"{self.major}.{self.minor}.0"


def _model(tmp_path, precision="fp32", name="m.onnx") -> Path:
    import onnx

    from spade_edge.runtime.modelinfo import METADATA_KEY, ModelInfo

    path = tmp_path / name
    info = tiny_onnx(path, size=224)
    if precision != "fp32":
        model = onnx.load(str(path))
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, {METADATA_KEY: dataclasses.replace(info, precision=precision).to_json()})
        onnx.save(model, str(path))
    assert ModelInfo.from_metadata(onnx_metadata(path)).precision == precision
    return path


def test_version_is_detected_once_and_compared_as_a_version(monkeypatch):
    assert record.parse_version("10.16.1.11") > record.parse_version("10.3.0")  # "10.16" < "10.3" as strings
    calls = []
    fake = SimpleNamespace(__version__="10.3.0")
    monkeypatch.setattr(record, "_trt", lambda: calls.append(1) or fake)
    record.tensorrt_version.cache_clear()
    try:
        assert record.tensorrt_version() == record.parse_version("10.3") and record.tensorrt_version().major == 10
        assert len(calls) == 1
    finally:
        record.tensorrt_version.cache_clear()


def test_version_routing(monkeypatch):
    monkeypatch.setattr(record, "tensorrt_version", lambda: FakeVersion(10, 3))
    p = plans.build_plan("fp16", "fp32")
    assert p.network_flags == ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH",)
    assert p.builder_flags == ("BuilderFlag.FP16",) and p.trtexec_flags == ("--fp16",)
    # the layers an INT8 Q/DQ model keeps in float run in fp16, not fp32
    assert plans.build_plan("int8", "int8").builder_flags == ("BuilderFlag.INT8", "BuilderFlag.FP16")
    assert plans.build_plan("fp32", "fp32").builder_flags == ()
    with pytest.raises(EngineError, match="no implicit INT8 calibration"):
        plans.build_plan("int8", "fp32")
    with pytest.raises(EngineError, match="from a int8 model"):
        plans.build_plan("fp32", "int8")
    monkeypatch.setattr(record, "tensorrt_version", lambda: FakeVersion(11, 4))
    p = plans.build_plan("int8", "int8")
    assert p == plans.BuildPlan(("NetworkDefinitionCreationFlag.STRONGLY_TYPED",), (), ("--stronglyTyped",))
    with pytest.raises(EngineError, match="strongly typed.*this model is fp32, not fp16.*calibrate --precision fp16"):
        plans.build_plan("fp16", "fp32")
    with pytest.raises(EngineError, match="model is fp16, not int8"):
        plans.build_plan("int8", "fp16")
    monkeypatch.setattr(record, "tensorrt_version", lambda: FakeVersion(8, 6))
    with pytest.raises(EngineError, match="too old"):
        plans.build_plan("fp32", "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        plans.build_plan("bf16", "fp32", version=FakeVersion(10))


def test_trtexec_command_tensorrt10(tmp_path):
    model = _model(tmp_path)
    cmd = trtexec_command(
        model, tmp_path / "m.engine", "fp16", 8, 2048, tmp_path / "t.cache", version=FakeVersion(10, 3)
    )
    assert cmd == (
        f"trtexec --onnx={model} --saveEngine={tmp_path / 'm.engine'} --minShapes=image:1x224x224x3 "
        "--optShapes=image:1x224x224x3 --maxShapes=image:8x224x224x3 --memPoolSize=workspace:2048M "
        f"--fp16 --timingCacheFile={tmp_path / 't.cache'}"
    )
    int8 = trtexec_args(_model(tmp_path, "int8", "q.onnx"), "q.engine", "int8", 4, version=FakeVersion(10, 3))
    assert "--int8" in int8 and "--maxShapes=image:4x224x224x3" in int8 and "--fp16" in int8
    assert not any(a.startswith("--timingCacheFile") for a in int8)
    with pytest.raises(EngineError):
        trtexec_command(model, "x.engine", "int8", version=FakeVersion(10, 3))


def test_trtexec_command_tensorrt11(tmp_path):
    half = _model(tmp_path, "fp16")
    args = trtexec_args(half, "h.engine", "fp16", 2, 512, version=FakeVersion(11, 4))
    assert args[-2:] == ["--memPoolSize=workspace:512M", "--stronglyTyped"]
    assert "--optShapes=image:1x224x224x3" in args and "--maxShapes=image:2x224x224x3" in args
    assert "--fp16" not in args
    with pytest.raises(EngineError, match="TensorRT 11 builds strongly typed"):
        trtexec_command(_model(tmp_path, "fp32", "f.onnx"), "f.engine", "fp16", version=FakeVersion(11, 4))


def test_onnx_metadata_without_onnx_matches_onnx(tmp_path, lite0_onnx):
    import onnx

    for path in (_model(tmp_path), lite0_onnx):
        expected = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert onnx_metadata(path) == expected and "spade_edge" in expected
    (tmp_path / "bad.onnx").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ModelError, match="not an ONNX model"):
        onnx_metadata(tmp_path / "bad.onnx")


GPU = {"name": "Orin", "compute_capability": "8.7"}


def _engine(tmp_path, monkeypatch):
    model = _model(tmp_path)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine")
    monkeypatch.setattr(record, "tensorrt_version", lambda: record.parse_version("10.3.0"))
    monkeypatch.setattr(record, "gpu_identity", lambda device=0: dict(GPU))
    r = _cli("engine", "sidecar", str(engine), "-m", str(model), "--precision", "fp16", "--max-batch", "4")
    assert r.exit_code == 0 and r.output.strip() == str(record.sidecar_path(engine)), r.output
    return model, engine


def _cli(*args):
    return CliRunner().invoke(cli, list(args))


def test_sidecar_records_what_invalidates_the_engine(tmp_path, monkeypatch):
    model, engine = _engine(tmp_path, monkeypatch)
    rec = json.loads(record.sidecar_path(engine).read_text())
    assert record.sidecar_path(engine).name == "m.engine.json"
    assert rec["onnx"]["sha256"] == record.file_sha256(model) and rec["tensorrt"] == "10.3.0" and rec["gpu"] == GPU
    assert rec["model"]["fingerprint"] == "sha256:tiny" and rec["model"]["precision"] == "fp32"
    assert rec["engine"]["precision"] == "fp16" and rec["model_info"]["precision"] == "fp16"
    assert rec["build"] == {
        "tool": "trtexec",
        "precision": "fp16",
        "max_batch": 4,
        "workspace_mb": 1024,
        "timing_cache": None,
        "flags": ["NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "BuilderFlag.FP16"],
    }
    assert record.check_engine(engine, model) == rec
    r = _cli("engine", "check", str(engine), "-m", str(model))
    assert r.exit_code == 0 and r.output == f"{engine}: ok (fp16, TensorRT 10.3.0, Orin)\n", r.output


def test_check_engine_refuses_what_does_not_match(tmp_path, monkeypatch):
    model, engine = _engine(tmp_path, monkeypatch)
    other = tiny_onnx(tmp_path / "other.onnx", size=224, fingerprint="sha256:other") and tmp_path / "other.onnx"
    with pytest.raises(EngineError, match="built from another model than .*other.onnx .ONNX SHA-256 differs"):
        record.check_engine(engine, other)
    r = _cli("engine", "check", str(engine), "-m", str(other))
    assert r.exit_code == 1 and "Error: " in r.output and "ONNX SHA-256 differs" in r.output, r.output
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0, this is TensorRT 10.16.1.11"):
        record.check_engine(engine, model, trt_version="10.16.1.11")
    with pytest.raises(EngineError, match=r"built for Orin \(compute capability 8.7\), this GPU is .*RTX 4090"):
        record.check_engine(engine, model, gpu={"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"})
    with pytest.raises(EngineError, match="compute capability 8.7.*compute capability 8.9"):
        record.check_engine(engine, model, gpu={"name": "Orin", "compute_capability": "8.9"})
    engine.write_bytes(b"another engine")
    with pytest.raises(EngineError, match="not the engine its sidecar records"):
        record.check_engine(engine, model)
    record.sidecar_path(engine).unlink()
    with pytest.raises(EngineError, match="no sidecar m.engine.json"):
        record.check_engine(engine)


def test_tensorrt_backend_refuses_a_stale_engine_before_touching_tensorrt(tmp_path, monkeypatch):
    from spade_edge.runtime.features.tensorrt import TensorRTBackend

    _, engine = _engine(tmp_path, monkeypatch)
    with pytest.raises(EngineError, match="ONNX SHA-256 differs"):
        TensorRTBackend(engine, _model(tmp_path, "int8", "q.onnx"))


def test_modules_import_without_tensorrt():
    code = (
        "import sys; import spade_edge.export.engine, spade_edge.export.trt_plans, spade_edge.export.trtexec, "
        "spade_edge.export.trt_ops, spade_edge.runtime.engine_record, spade_edge.runtime.features.tensorrt, "
        "spade_edge.cli; "
        "print(sorted(m for m in ('tensorrt', 'tensorrt_bindings', 'cupy', 'pycuda', 'onnx', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout


def test_build_engine_script_dry_run(tmp_path):
    model = _model(tmp_path, "fp16")
    script = ROOT / "jetson" / "build-engine.sh"
    env = dict(os.environ, TRT_VERSION="11.4.0", PYTHON=sys.executable, DRY_RUN="1")
    out = subprocess.run(
        ["bash", str(script), str(model), str(tmp_path / "h.engine"), "fp16", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    expected = trtexec_args(model, tmp_path / "h.engine", "fp16", 4, version=FakeVersion(11, 4))
    lines = out.stdout.splitlines()
    assert any(line.endswith(" ".join(expected[1:])) for line in lines), out.stdout
    assert any("-m spade_edge engine sidecar" in line for line in lines), out.stdout
    bad = subprocess.run(
        ["bash", str(script), str(model), str(tmp_path / "h.engine"), "int8", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode != 0 and "strongly typed" in bad.stderr


# ---------------------------------------------------------------------------- the glue, on the GPU stand-ins
# The import-boundary stand-ins of tests/standins (their names checked against the real bindings by
# tests/test_standins.py): a builder that records what it was handed in the engine it writes, an
# engine that runs the ONNX model with ONNX Runtime, CuPy memory on numpy. What no GPU-less machine
# could otherwise run: flags and profile handed to the builder, timing cache round trip, sidecar,
# buffers and tensor addresses, batch slicing.


@pytest.mark.parametrize(
    "version, precision, model_precision, network_flags, builder_flags",
    [
        ("10.3.0", "fp16", "fp32", ["EXPLICIT_BATCH"], ["FP16"]),
        ("10.3.0", "int8", "int8", ["EXPLICIT_BATCH"], ["FP16", "INT8"]),
        ("11.4.0", "int8", "int8", ["STRONGLY_TYPED"], []),
    ],
)
def test_build_and_run_glue_on_the_standins(
    tmp_path, monkeypatch, version, precision, model_precision, network_flags, builder_flags
):
    from spade_edge.runtime.features import backend_from_model
    from spade_edge.runtime.features.tensorrt import TensorRTBackend

    use_standins(monkeypatch, trt_version=version)
    import tensorrt as trt
    from tensorrt._plan import pack_cache, unpack_cache, unpack_engine

    model = tmp_path / "tiny.onnx"
    tiny_onnx(model, size=32)
    if model_precision != "fp32":
        model = _relabel(model, model_precision)
    cache = tmp_path / "timing.cache"

    def build():
        return eng.engine_from_onnx(
            model, tmp_path / "e" / "tiny.engine", precision, max_batch=3, workspace_mb=64, timing_cache=cache
        )

    out = build()
    # what the builder was handed, as the engine records it
    header, _ = unpack_engine(out.read_bytes())
    assert header["network_flags"] == network_flags and header["builder_flags"] == builder_flags
    assert header["workspace"] == 64 << 20 and header["tensorrt"] == version
    assert header["profiles"] == [{"image": [[1, 32, 32, 3], [1, 32, 32, 3], [3, 32, 32, 3]]}]
    engine = trt.Runtime(record.make_logger(trt)).deserialize_cuda_engine(out.read_bytes())
    assert [tuple(d) for d in engine.get_tensor_profile_shape("image", 0)] == [
        (1, 32, 32, 3),
        (1, 32, 32, 3),
        (3, 32, 32, 3),
    ]
    # the timing cache: written after a build, read and added to by the next; another's is replaced
    assert unpack_cache(cache.read_bytes())["entries"] == 1
    build()
    assert unpack_cache(cache.read_bytes())["entries"] == 2
    theirs = {**unpack_cache(cache.read_bytes()), "tensorrt": "10.16.1.11", "entries": 40}
    for stale in (pack_cache(theirs), b"not a timing cache"):
        cache.write_bytes(stale)
        build()
        assert unpack_cache(cache.read_bytes()) == {**theirs, "tensorrt": version, "entries": 1}
    # the sidecar
    rec = record.check_engine(out, model)
    flags = rec["build"].pop("flags")
    assert rec["build"] == {
        "tool": "tensorrt-python",
        "precision": precision,
        "max_batch": 3,
        "workspace_mb": 64,
        "timing_cache": str(cache),
    }
    assert sorted(flags) == sorted(
        [f"NetworkDefinitionCreationFlag.{f}" for f in network_flags] + [f"BuilderFlag.{f}" for f in builder_flags]
    )
    assert rec["engine"]["precision"] == rec["model_info"]["precision"] == precision and rec["tensorrt"] == version

    # the runtime backend: buffers for the profile's largest batch, larger batches in slices
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    want = backend_from_model(model, "cpu")(x)
    with TensorRTBackend(out, model) as backend:
        assert backend.info.precision == precision and backend.max_batch == 3
        for batch in (x, x[:1], x[:3]):  # 7: slices of 3, 3, 1
            got = backend(batch)
            assert set(got) == set(want)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k][: len(batch)])
        assert all(v.shape == (0, *want[k].shape[1:]) for k, v in backend(x[:0]).items())


def _relabel(path: Path, precision: str) -> Path:
    import onnx

    from spade_edge.runtime.modelinfo import METADATA_KEY, ModelInfo

    model = onnx.load(str(path))
    info = ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: dataclasses.replace(info, precision=precision).to_json()})
    out = path.with_name(f"{path.stem}.{precision}.onnx")
    onnx.save(model, str(out))
    return out
