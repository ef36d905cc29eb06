"""Fuzzing the gallery and the model files (issue 17): seeded mutations of real galleries (headers,
manifests, arrays; with and without their checksums recomputed) and of a real model (weights, graph,
metadata; with and without its digest re-stamped). Every case is loaded and scored in a worker
process, so that a segmentation fault is counted as a crash (and the worker restarted) instead of
ending the test run. Each case must end in a clear error (spade-edge's own error types) or a correct
result: finite scores, well-formed outputs, and the original's exact result where the mutation left
nothing that scoring reads. Bounded in time (FUZZ_SECONDS, default 45 s) and printed as counts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from .test_model_integrity import conv_onnx

SEED = int(os.environ.get("FUZZ_SEED", "17"))
BUDGET_S = float(os.environ.get("FUZZ_SECONDS", "45"))
GALLERY_CASES, MODEL_CASES = 6000, 1200
CASE_TIMEOUT_S = 30.0
ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------- the worker process


def _summary(p) -> dict:
    return {
        "score": float(p.score),
        "verdict": p.verdict,
        "neighbors": list(p.neighbors),
        "map_sum": float(np.asarray(p.anomaly_map, np.float64).sum()),
        "map_shape": list(p.anomaly_map.shape),
        "map_finite": bool(np.isfinite(p.anomaly_map).all()),
    }


def worker() -> None:  # pragma: no cover - runs in the subprocess
    """Read one case per line (JSON) from stdin, answer one JSON line: what loading and scoring did."""
    import resource
    import traceback
    import warnings

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway allocation fails, not the machine
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own channel:
    os.dup2(2, 1)  # what native code prints (ONNX Runtime's "EP Error") goes to the log instead
    warnings.simplefilter("ignore")
    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.device import place
    from spade_edge.runtime.errors import SpadeError
    from spade_edge.runtime.gallery import Gallery
    from spade_edge.runtime.images import load_image

    setup = json.loads(sys.stdin.readline())
    backend = place(setup["model"], "cpu").backend
    galleries = {k: Gallery.load(v) for k, v in setup["galleries"].items()}
    x = {}
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        stage = "load"
        try:
            if case["kind"] == "gallery":
                g = Gallery.load(case["path"])
                stage = "detector"
                det = Detector(backend, g)
                stage = "predict"
                image = load_image(setup["image"])
                out = {
                    "outcome": "accepted",
                    "result": _summary(det.predict(image)),
                    "names": list(g.names),
                    "k_gallery": det.config.k_gallery,
                }
            else:
                b = place(case["path"], "cpu").backend
                stage = "features"
                if "batch" not in x:
                    x["batch"] = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
                feats = b(x["batch"])
                digest = hashlib.sha256(b"".join(np.ascontiguousarray(feats[k]).tobytes() for k in sorted(feats)))
                stage = "detector"
                det = Detector(b, galleries[case.get("gallery", "coreset")])
                stage = "predict"
                out = {
                    "outcome": "accepted",
                    "features": digest.hexdigest(),
                    "result": _summary(det.predict(x["batch"][0])),
                }
                b.close()
        except SpadeError as exc:
            out = {"outcome": "error", "stage": stage, "type": type(exc).__name__, "message": str(exc)[:300]}
        except ValueError as exc:
            documented = stage == "detector" and "needs the normal statistics" in str(exc)
            out = {
                "outcome": "error" if documented else "unclear",
                "stage": stage,
                "type": type(exc).__name__,
                "message": str(exc)[:300],
                "trace": "" if documented else traceback.format_exc()[-1500:],
            }
        except BaseException as exc:  # noqa: BLE001 - every other exception is a finding
            out = {
                "outcome": "unclear",
                "stage": stage,
                "type": type(exc).__name__,
                "message": str(exc)[:300],
                "trace": traceback.format_exc()[-1500:],
            }
        print(json.dumps(out), file=answers, flush=True)


class Worker:
    """The worker process, restarted after a crash; ``run(case)`` -> its answer, or a crash record."""

    def __init__(self, setup: dict, log: Path):
        self.setup, self.proc, self.starts, self.log = setup, None, 0, log

    def start(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.runtime.test_gallery_fuzz import worker; worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "a"),
            text=True,
            cwd=ROOT,
            env=env,
            bufsize=1,
        )
        self.starts += 1
        self.proc.stdin.write(json.dumps(self.setup) + "\n")
        self.proc.stdin.flush()
        ready = self._answer(120)
        assert ready == {"ready": True}, (ready, self.log.read_text()[-3000:])

    def _answer(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        answer = self._answer(CASE_TIMEOUT_S)
        if answer is None:  # died (a crash) or hung: either is a finding
            if self.proc.poll() is None:
                self.proc.kill()
            rc = self.proc.wait()
            err = self.log.read_text(errors="replace")[-1500:]
            self.proc = None
            return {"outcome": "crash", "returncode": rc, "stderr": err}
        return answer

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


# --------------------------------------------------------------------------------- mutations

SPECIAL = [
    0,
    -1,
    1,
    2,
    3,
    7,
    64,
    255,
    256,
    65535,
    2**31,
    2**63,
    -(2**63),
    10**30,
    1e9,
    -1e9,
    0.5,
    -0.5,
    1e-300,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "x",
    "|O",
    ">f4",
    "<f8",
    "<f2",
    "|i1",
    "|u1",
    "<u2",
    "<i8",
    "<f4",
    "|b1",
    "<U4",
    "|V8",
    "<c8",
    "O",
    "concat",
    "per-level",
    "combined",
    "fp16",
    "int8",
    "pca",
    None,
    True,
    False,
    [],
    {},
    [0],
    [1, 2],
    [0, 0],
    [1, 1],
    [2, 2],
    [-1, 3],
    [7, 3],
    [10**9, 1],
    {"grid": [8, 8]},
    "sha256:test",
    "a",
    "b",
    "level/a",
    ["a"],
    ["zz"],
    "0" * 64,
]


def _nodes(obj, trail=()):
    """Every (container, key) in a JSON tree, with its trail of keys."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield obj, k, trail + (k,)
        yield from _nodes(v, trail + (k,))


def mutate_manifest(m: dict, rng) -> str:
    """Change ``m`` in place; returns what was done."""
    nodes = list(_nodes(m))
    parent, key, trail = nodes[rng.integers(len(nodes))]
    op = rng.integers(8)
    if op <= 2:
        value = copy.deepcopy(SPECIAL[rng.integers(len(SPECIAL))])
        parent[key] = value
        return f"set {trail} = {value!r}"[:160]
    if op == 3:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
        return f"delete {trail}"
    if op == 4 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        delta = [1, -1, 64, -64, 8, 2**32][rng.integers(6)]
        parent[key] = parent[key] + delta
        return f"add {delta} to {trail}"
    if op == 5:  # another node's value in its place (a plausible, wrong value)
        _, _, other = nodes[rng.integers(len(nodes))]
        src = m
        try:
            for k in other:
                src = src[k]
        except (KeyError, IndexError, TypeError):
            return "nothing"
        parent[key] = copy.deepcopy(src)
        return f"copy {other} to {trail}"
    if op == 6 and isinstance(parent[key], list) and parent[key]:
        lst = parent[key]
        if rng.integers(2):
            lst.append(copy.deepcopy(lst[rng.integers(len(lst))]))
            return f"append to {trail}"
        lst.pop(rng.integers(len(lst)))
        return f"drop from {trail}"
    if op == 7:  # swap two arrays' table entries
        keys = list(m.get("arrays", {})) if isinstance(m.get("arrays"), dict) else []
        if len(keys) >= 2:
            a, b = rng.choice(len(keys), 2, replace=False)
            t = m["arrays"]
            t[keys[a]], t[keys[b]] = t[keys[b]], t[keys[a]]
            return f"swap arrays {keys[a]} {keys[b]}"
    parent[key] = copy.deepcopy(SPECIAL[rng.integers(len(SPECIAL))])
    return f"set {trail}"


def mutate_array(manifest: dict, data: bytearray, rng) -> str:
    """Change a few values of one array (its checksum recomputed by the caller)."""
    key = list(manifest["arrays"])[rng.integers(len(manifest["arrays"]))]
    spec = manifest["arrays"][key]
    dtype = np.dtype(spec["dtype"])
    a = np.frombuffer(bytes(data[spec["offset"] : spec["offset"] + spec["nbytes"]]), dtype).copy()
    if not len(a):
        return "nothing"
    np.seterr(over="ignore")  # fp16 casts of large values: inf, on purpose
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(len(a)))
        if dtype.kind == "f":
            a[i] = [np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, rng.normal() * 100, 65504.0][rng.integers(8)]
        else:
            info = np.iinfo(dtype)
            value = [0, 1, info.max, info.min, int(a[i]) + 1, int(a[i]) - 1, int(rng.integers(info.min, info.max))][
                rng.integers(7)
            ]
            a[i] = min(max(value, info.min), info.max)
    data[spec["offset"] : spec["offset"] + spec["nbytes"]] = a.tobytes()
    spec["sha256"] = hashlib.sha256(a.tobytes()).hexdigest()
    return f"values of {key}"


def gallery_case(original: bytes, rng) -> tuple[bytes, str, bool]:
    """(file, what was done, whether scoring must give the original's exact result)."""
    kind = rng.integers(10)
    if kind <= 2:  # damage: bytes flipped anywhere, checksums not recomputed
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        return bytes(data), "flipped bytes", True
    if kind == 3:  # cut short, or grown
        cut = int(rng.integers(len(original)))
        return (
            (original[:cut], f"truncated at {cut}", True)
            if rng.integers(2)
            else (original + bytes(int(rng.integers(1, 200))), "grown", True)
        )
    n = int.from_bytes(original[8:16], "little")
    manifest, data = json.loads(original[48 : 48 + n]), bytearray(original[48 + n :])
    if kind <= 7:
        what = "; ".join(mutate_manifest(manifest, rng) for _ in range(int(rng.integers(1, 3))))
    else:
        what = mutate_array(manifest, data, rng)
    blob = json.dumps(manifest).encode()
    blob += b" " * ((-(48 + len(blob))) % 64)
    return (
        b"SPADEGAL" + len(blob).to_bytes(8, "little") + hashlib.sha256(blob).digest() + blob + bytes(data),
        "crafted: " + what,
        False,
    )


def model_case(original: bytes, proto_bytes: bytes, info, rng) -> tuple[bytes, str, bool]:
    """(file, what was done, whether the features must equal the original's)."""
    kind = rng.integers(10)
    if kind <= 3:  # damage anywhere: weights, graph, metadata, framing
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 3))):
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        return bytes(data), "flipped bytes", True
    if kind == 4:
        cut = int(rng.integers(len(original)))
        return original[:cut], f"truncated at {cut}", True
    import onnx

    from spade_edge.runtime import fingerprint
    from spade_edge.runtime.modelinfo import METADATA_KEY

    model = onnx.ModelProto()
    model.ParseFromString(proto_bytes)
    d = json.loads(info.to_json())
    what = mutate_manifest(d, rng)
    text = json.dumps(d)
    if kind >= 8:  # crafted and re-stamped: the digest matches, the description must still make sense
        try:
            from spade_edge.runtime.modelinfo import ModelInfo

            crafted = ModelInfo.from_json(text)
            text = fingerprint.stamp(model, crafted).to_json()
            what = "re-stamped: " + what
        except Exception:  # noqa: BLE001 - a description that does not parse cannot be stamped: keep it as is
            what = "unparsable: " + what
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: text})
    return model.SerializeToString(), "description: " + what, False


# --------------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A real model with weights and real galleries built from it."""
    from PIL import Image

    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.codec import Storage
    from spade_edge.runtime.features import backend_from_model
    from spade_edge.runtime.spade import SpadeConfig

    root = tmp_path_factory.mktemp("fuzz")
    model = root / "conv.onnx"
    info, _ = conv_onnx(model)
    rng = np.random.default_rng(0)
    images = []
    for i in range(10):
        images.append(root / f"{i:02d}.png")
        Image.fromarray(rng.integers(60, 190, (36, 40, 3), dtype=np.uint8)).save(images[-1])
    backend = backend_from_model(model)
    galleries = {"coreset": root / "coreset.gallery", "dense": root / "dense.gallery", "fp16": root / "fp16.gallery"}
    gallery_from_images(
        backend, images[1:], galleries["coreset"], config=SpadeConfig(k_image=2, k_gallery=3), show_progress=False
    )
    gallery_from_images(
        backend,
        images[1:],
        galleries["dense"],
        config=SpadeConfig(k_image=2, k_gallery=4, mode="concat"),
        storage=Storage(precision="int8", projection="pca", keep=0.5, coreset=1.0),
        show_progress=False,
    )
    gallery_from_images(
        backend,
        images[1:],
        galleries["fp16"],
        holdout=0.0,
        config=SpadeConfig(score="max-pixel", kappa=2),
        storage=Storage(precision="fp16", coreset=1.0),
        show_progress=False,
    )
    return {"model": model, "info": info, "galleries": galleries, "image": images[0], "root": root}


def _check_accepted(answer: dict, baseline: dict, exact: bool) -> str | None:
    """Why an accepted case's result is not correct (None: it is)."""
    try:
        return _wrong(answer, baseline, exact)
    except Exception as exc:  # noqa: BLE001 - a result this check cannot read is not a correct one
        return f"unreadable result ({type(exc).__name__}: {exc}): {str(answer)[:300]}"


def _wrong(answer: dict, baseline: dict, exact: bool) -> str | None:
    r = answer["result"]
    if not (math.isfinite(r["score"]) and r["map_finite"] and r["map_shape"] == [32, 32]):
        return f"non-finite or misshapen result {r}"
    if r["verdict"] not in ("OK", "NOT_OK", None):
        return f"verdict {r['verdict']!r}"
    if "names" in answer and (
        not {json.dumps(n) for n in r["neighbors"]} <= {json.dumps(n) for n in answer["names"]}
        or len(r["neighbors"]) != min(answer["k_gallery"], len(answer["names"]))
    ):
        return f"neighbors {r['neighbors']} not among the gallery's images"
    if exact and r != baseline["result"]:
        return f"differs from the original: {r} vs {baseline['result']}"
    if "features" in answer and exact and answer["features"] != baseline["features"]:
        return "features differ from the original's"
    return None


def test_fuzz_galleries_and_models(material, tmp_path):
    from spade_edge.runtime.modelinfo import model_info_from_onnx

    rng = np.random.default_rng(SEED)
    setup = {
        "model": str(material["model"]),
        "image": str(material["image"]),
        "galleries": {k: str(v) for k, v in material["galleries"].items()},
    }
    w = Worker(setup, tmp_path / "worker.log")
    counts, findings, stages = Counter(), [], Counter()
    baselines = {}
    for name, path in material["galleries"].items():
        baselines[name] = w.run({"kind": "gallery", "path": str(path)})
        assert baselines[name]["outcome"] == "accepted", baselines[name]
    model_base = w.run({"kind": "model", "path": str(material["model"])})
    assert model_base["outcome"] == "accepted", model_base
    originals = {k: v.read_bytes() for k, v in material["galleries"].items()}
    model_bytes = material["model"].read_bytes()
    import onnx

    proto = onnx.load(str(material["model"]))
    del proto.metadata_props[:]
    proto_bytes = proto.SerializeToString()
    info = model_info_from_onnx(material["model"])

    plan = ["gallery"] * GALLERY_CASES + ["model"] * MODEL_CASES
    order = rng.permutation(len(plan))
    t0 = time.monotonic()
    target = tmp_path / "case"
    for i in order:
        if time.monotonic() - t0 > BUDGET_S:
            break
        kind = plan[i]
        if kind == "gallery":
            which = list(originals)[rng.integers(len(originals))]
            content, what, exact = gallery_case(originals[which], rng)
            path = target.with_suffix(".gallery")
            case = {"kind": "gallery", "path": str(path)}
            baseline = baselines[which]
        else:
            content, what, exact = model_case(model_bytes, proto_bytes, info, rng)
            path = target.with_suffix(".onnx")
            case = {"kind": "model", "path": str(path)}
            baseline = model_base
        path.write_bytes(content)
        answer = w.run(case)
        counts[f"{kind} cases"] += 1
        outcome = answer["outcome"]
        if outcome == "error":
            counts[f"{kind} clear errors"] += 1
            stages[f"{kind} {answer['stage']} {answer['type']}"] += 1
            continue
        if outcome == "accepted":
            why = _check_accepted(answer, baseline, exact)
            counts[f"{kind} accepted"] += 1
            if why is None:
                continue
            outcome = "wrong result"
            answer = {"why": why}
        counts[f"{kind} {outcome}"] += 1
        keep = tmp_path / f"finding-{len(findings)}{path.suffix}"
        keep.write_bytes(content)
        findings.append({"kind": kind, "outcome": outcome, "what": what, "file": str(keep), **answer})
    w.close()
    elapsed = time.monotonic() - t0
    total = counts["gallery cases"] + counts["model cases"]
    crashes = counts["gallery crash"] + counts["model crash"]
    print(
        f"\nfuzz (seed {SEED}, {elapsed:.1f} s, worker started {w.starts} times): {total} cases tried; "
        f"galleries {counts['gallery cases']}: {counts['gallery clear errors']} clear errors, "
        f"{counts['gallery accepted']} accepted; models {counts['model cases']}: {counts['model clear errors']} clear "
        f"errors, {counts['model accepted']} accepted; crashes={crashes}, unclear errors="
        f"{counts['gallery unclear'] + counts['model unclear']}, wrong results="
        f"{counts['gallery wrong result'] + counts['model wrong result']}"
    )
    print("refused at:", dict(stages.most_common(12)))
    for f in findings[:10]:
        print(json.dumps(f)[:2000])
    assert not findings, f"{len(findings)} findings (first above)"
    assert total >= 1000, f"only {total} cases in {BUDGET_S} s"
