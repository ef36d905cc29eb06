"""The ``spade-edge`` command line."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .options import device_option, scoring_options, scoring_overrides


def _friendly_errors(fn):
    """Known failures print one clear line (exit 1) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .runtime.errors import SpadeError

        try:
            return fn(*args, **kwargs)
        except (SpadeError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="spade-edge")
def main():
    """SPADE anomaly inspection at the edge: export a backbone, build a gallery of normal parts,
    score new parts (verdict, score, heat map, and which normal part each pixel matched).

    \b
    Typical flow:
      spade-edge export --backbone wide_resnet50_2 --out model.onnx
      spade-edge gallery build --model model.onnx --images good/ --out parts.gallery
      spade-edge infer --model model.onnx --gallery parts.gallery part1.png --heatmaps out/
    Try it on real solar-cell images first:  spade-edge demo
    """


@main.command()
@click.option(
    "--backbone",
    "-b",
    default="wide_resnet50_2",
    show_default=True,
    help="wide_resnet50_2 (SPADE's, alias wrn50x2) or efficientnet_lite0 (alias lite0).",
)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="ONNX file to write.")
@click.option(
    "--weights",
    help="State-dict file to load, or 'random' for random initialisation. "
    "Default: the backbone's ImageNet weights (packaged, or torch's cache).",
)
@click.option("--no-download", is_flag=True, help="Never try to download weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random initialisation.")
@click.option(
    "--parity/--no-parity", default=True, show_default=True, help="Compare ONNX Runtime with PyTorch after export."
)
@_friendly_errors
def export(backbone, out, weights, no_download, seed, parity):
    """Export a backbone's feature pyramid to ONNX (uint8 NHWC input, pre-processing and
    description inside the graph, dynamic batch)."""
    import numpy as np
    import torch

    from .export.backbones import canonical_name, create_backbone
    from .export.onnx_export import onnx_from_backbone
    from .export.weights import WeightsNotFoundError

    backbone = canonical_name(backbone)
    torch.manual_seed(seed)
    try:
        net = create_backbone(backbone, weights=weights, download=not no_download)
    except WeightsNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    info = onnx_from_backbone(net, backbone, out)
    click.echo(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {info.backbone}, input uint8 "
        f"(N,{info.input_size},{info.input_size},3), levels "
        + ", ".join(f"{lv.name}({lv.channels}, /{lv.stride})" for lv in info.levels)
        + f", {info.global_name}({info.global_channels}); fingerprint {info.fingerprint[:23]}"
    )
    if parity:
        from .export.parity import compare_with_torch

        imgs = np.random.default_rng(seed).integers(0, 256, (2, info.input_size, info.input_size, 3), dtype=np.uint8)
        result = compare_with_torch(net, out, imgs)
        click.echo(str(result))
        if not result:
            sys.exit(1)


@main.group()
def gallery():
    """Build and inspect galleries of normal parts."""


from .runtime.codec import DEFAULT_CORESET, DEFAULT_PRECISION  # noqa: E402  (the storage defaults' one home)


@gallery.command("build")
@click.option(
    "--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True, help="ONNX model from 'export'."
)
@click.option(
    "--images", "-i", type=click.Path(exists=True, file_okay=False), required=True, help="Folder of normal images."
)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Gallery file to write."
)
@click.option(
    "--holdout",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of images kept out of the gallery to set the thresholds.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split.")
@click.option(
    "--crop/--no-crop",
    default=True,
    show_default=True,
    help="Resize+centre-crop (paper) or resize the whole image (keeps the borders in view).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=DEFAULT_PRECISION,
    show_default=True,
    help="Stored precision of pixel features (int8: per-channel symmetric scales). The default "
    "(runtime/codec.py) is the Python API's too.",
)
@click.option(
    "--projection",
    type=click.Choice(["none", "pca", "random"]),
    default="none",
    show_default=True,
    help="Channel reduction fitted on the normal features, applied to test features too.",
)
@click.option(
    "--keep",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="Share of each level's channels kept by --projection.",
)
@click.option(
    "--coreset",
    type=click.FloatRange(0, 1, min_open=True),
    help=f"Share of each image's pixels kept by greedy k-center (per-level mode; 1 keeps all). "
    f"[default: {DEFAULT_CORESET} in per-level mode, 1 in concat mode, which needs every pixel]",
)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime and the scorer.")
@device_option
@scoring_options
@_friendly_errors
def gallery_build(
    model,
    images,
    out,
    holdout,
    seed,
    crop,
    precision,
    projection,
    keep,
    coreset,
    batch_size,
    threads,
    device,
    fp16,
    **scoring,
):
    """Extract features of normal images into a gallery (no torch needed)."""
    from .runtime.build import gallery_from_images
    from .runtime.codec import Storage
    from .runtime.features import backend_from_model
    from .runtime.images import Preprocess, list_images
    from .runtime.spade import SpadeConfig

    backend = backend_from_model(model, device=device, threads=threads, fp16=fp16)
    config = SpadeConfig(**scoring_overrides(**scoring))
    storage = Storage.default(
        config.mode,
        precision=precision,
        projection=projection,
        keep=keep,
        seed=seed,
        **({} if coreset is None else {"coreset": coreset}),
    )
    g = gallery_from_images(
        backend,
        list_images(images),
        out,
        holdout=holdout,
        seed=seed,
        storage=storage,
        preprocess=Preprocess(backend.info.input_size, crop),
        config=config,
        batch_size=batch_size,
    )
    th = g.thresholds
    click.echo(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(g)} images"
        + (
            f", image threshold {th['image']:.4f} from {len(th['heldout'])} held-out"
            if th
            else ", no thresholds (holdout 0)"
        )
    )


def _describe(g) -> dict:
    m = g.manifest
    sizes = g.nbytes()
    n = max(len(g), 1)
    fp32 = sum(
        int(np.prod(st.grid)) * (st.codec.proj.shape[0] if st.codec.proj is not None else st.channels) * 4
        for st in g.levels.values()
    )
    return {
        "images": len(g),
        "model": m["model"].get("backbone"),
        "fingerprint": g.fingerprint,
        "storage": g.storage,
        "preprocess": m.get("preprocess"),
        "config": m.get("config"),
        "bytes_per_image": {
            "pixel_levels": round(sizes["levels"] / n),
            "global": round(sizes["global"] / n),
            "thumbnails": round(sizes["thumbnails"] / n),
            "fp32_native_levels": fp32,
            "compression": round(fp32 / max(sizes["levels"] / n, 1), 2),
        },
        "file_bytes": g.path.stat().st_size if g.path else None,
        "thresholds": {k: v for k, v in g.thresholds.items() if k in ("image", "pixel", "rule")},
        "arrays": {k: f"{v['dtype']} {v['shape']}" for k, v in m["arrays"].items()},
        "build": m.get("build"),
        "history": m.get("history", []),
    }


@gallery.command("info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_friendly_errors
def gallery_info(path):
    """Print what a gallery holds: images, storage, bytes per image, settings (checks every checksum)."""
    from .runtime.gallery import Gallery

    click.echo(json.dumps(_describe(Gallery.load(path)), indent=2))


@gallery.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model", "-m", type=click.Path(exists=True, dir_okay=False), help="Also check it belongs to this model."
)
@_friendly_errors
def gallery_verify(path, model):
    """Check the whole file: every checksum, the manifest, shapes, settings and index arrays (and,
    with --model, the model's weights against their digest and the gallery against the model); exit
    1 on any problem."""
    from .runtime.gallery import Gallery

    g = Gallery.load(path, verify=True)
    said = ""
    if model:
        from .runtime.device import is_engine

        if is_engine(model):
            from .runtime.features import backend_from_model

            info = backend_from_model(model).info
            said = ", model matches"
        else:  # no session needed: the digest is recomputed from the file (runtime/fingerprint.py)
            from .runtime.fingerprint import WEIGHTS_KEY
            from .runtime.modelinfo import model_info_from_onnx

            info = model_info_from_onnx(model)
            said = (
                ", model weights verified, model matches"
                if WEIGHTS_KEY in info.extra
                else ", model matches (its weights carry no digest to verify: re-export it)"
            )
        g.check_model(info)
    click.echo(f"{path}: OK ({len(g)} images, {len(g.manifest['arrays'])} arrays and the manifest verified{said})")


@gallery.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime.")
@device_option
@_friendly_errors
def gallery_add(path, images, model, threads, device, fp16):
    """Add normal images (files or folders) without a rebuild; stored codecs and thresholds are kept."""
    from .runtime.build import add_images
    from .runtime.features import backend_from_model
    from .runtime.images import list_images
    from .service import generations

    files = [f for p in images for f in (list_images(p) if Path(p).is_dir() else [Path(p)])]
    backend = backend_from_model(model, device=device, threads=threads, fp16=fp16)
    added = []  # a recorded change (gallery history / rollback), like one from the operator's page
    e = generations.change(
        path,
        "add",
        lambda: added.append(add_images(path, backend, files, locked=True)),
        client=_cli_client(),
        detail={"added": [f.name for f in files][:100], "count": len(files)},
    )
    click.echo(f"{path}: {len(added[0])} images (+{len(files)}), generation {e['generation']}")


@gallery.command("remove")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("names", nargs=-1, required=True)
@_friendly_errors
def gallery_remove(path, names):
    """Remove images by name (as 'gallery info' or 'infer' report them)."""
    from .runtime.build import remove_images
    from .service import generations

    kept = []
    e = generations.change(
        path,
        "remove",
        lambda: kept.append(remove_images(path, list(names), locked=True)),
        client=_cli_client(),
        detail={"removed": list(names)[:100], "count": len(names)},
    )
    click.echo(f"{path}: {len(kept[0])} images (-{len(names)}), generation {e['generation']}")


def _cli_client() -> str:
    """Who made a gallery change from the command line, as the history records it."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        user = str(os.getuid())
    return f"cli {user}@{socket.gethostname()}"


@gallery.command("history")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_friendly_errors
def gallery_history(path):
    """The gallery's recorded changes (the operator's page, gallery add/remove/rollback): generation, what,
    when, which client; '*' marks generations whose file is kept and can be restored."""
    from .service import generations

    keep = set(generations.restorable(path))
    entries = generations.log(path)
    click.echo(f"{path}: generation {generations.current(path)}")
    click.echo(f"{'*' if 0 in keep else ' '}     0  (before the first recorded change)")
    for e in entries:
        mark = "*" if e["generation"] in keep else " "
        detail = json.dumps(e.get("detail", {}))
        click.echo(f"{mark} {e['generation']:5d}  {e['time']}  {e['action']:<9} {e['client']}  {detail}")


@gallery.command("rollback")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "to", type=click.IntRange(0), help="Generation to restore [default: the one before the last].")
@_friendly_errors
def gallery_rollback(path, to):
    """Put an earlier generation of the gallery back (recorded as a new generation, so it can be
    undone too). A running service uses it after a reload (SIGHUP or POST /reload)."""
    from .service import generations

    e = generations.rollback(path, to, client=_cli_client())
    click.echo(f"{path}: generation {e['generation']} = generation {e['detail']['to']}; reload the service to use it")


@main.command()
@click.option("--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--gallery", "-g", "gallery_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--heatmaps",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a PNG per image: input, heat map overlay, matched normal image.",
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime and the scorer.")
@device_option
@scoring_options
@_friendly_errors
def infer(model, gallery_path, images, heatmaps, threads, device, fp16, **scoring):
    """Score images; print one JSON line per image (score, verdict, worst pixel and its match)."""
    from .runtime.detector import Detector
    from .runtime.errors import ImageError

    det = Detector.load(model, gallery_path, device=device, threads=threads, fp16=fp16, **scoring_overrides(**scoring))
    click.echo(f"device: {det.device}", err=True)
    failed = 0
    for path in images:
        try:
            p = det.predict(path)
        except ImageError as exc:  # one bad file must not stop the others
            failed += 1
            click.echo(json.dumps({"image": path, "error": str(exc)}))
            continue
        line = p.to_dict()
        if heatmaps:
            from .render import save_heatmap

            line["heatmap"] = str(save_heatmap(p, det.gallery, heatmaps))
        click.echo(json.dumps(line))
    if failed:
        raise click.ClickException(f"{failed} of {len(images)} images could not be scored (see their 'error' lines)")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="spade-edge-demo", show_default=True)
@click.option(
    "--gallery-size", type=click.IntRange(10), default=100, show_default=True, help="Normal cells for the gallery."
)
@click.option(
    "--test-size", type=click.IntRange(2), default=40, show_default=True, help="Normal and defective test cells, each."
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime.")
@_friendly_errors
def demo(out, gallery_size, test_size, threads):
    """Run everything on real data: EfficientNet-Lite0 (ImageNet weights) exported to ONNX, a
    gallery of normal ELPV solar cells, held-out normal and defective cells scored, heat maps written."""
    from .demo import DemoPlan, run_demo

    s = run_demo(out, DemoPlan(n_gallery=gallery_size, n_test=test_size, threads=threads), echo=click.echo)
    click.echo(
        f"\nimage AUROC {s['image_auroc']:.3f} (the image score: image stage + top 1% of the anomaly map); "
        f"{s['image_stage_auroc']:.3f} from the image stage alone, {s['max_pixel_auroc']:.3f} from the map maximum; "
        f"verdicts right on {s['verdict_accuracy']:.0%} of test cells; {s['ms_per_image']:.0f} ms per image\n"
        f"heat maps: {s['heatmaps']}/{{normal,defective}}/*.png\nsummary: {Path(out) / 'summary.json'}  "
        f"(total {s['seconds']:.0f} s)"
    )


@main.command()
@click.option(
    "--data",
    "-d",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="An MVTec AD category (train/good, test/<type>, ground_truth/<type>) or a folder of them.",
)
@click.option(
    "--model",
    "-m",
    type=click.Path(exists=True, dir_okay=False),
    help="ONNX model (default: EfficientNet-Lite0 with ImageNet weights, exported on first use).",
)
@click.option(
    "--out", "-o", type=click.Path(file_okay=False, path_type=Path), default="spade-edge-eval", show_default=True
)
@click.option(
    "--crop/--no-crop", default=True, show_default=True, help="Resize+centre-crop, or resize the whole image."
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime and the scorer.")
@device_option
@scoring_options
@_friendly_errors
def evaluate(data, model, out, crop, threads, device, fp16, **scoring):
    """Build a gallery from train/good, score test/*, and write metrics (image and pixel AUROC,
    AUPRO, F1-max), curves, per-defect-type tables, timings and the worst cases: per-category
    JSON, report.md and a self-contained report.html."""
    from .evaluate import evaluate as run_eval
    from .runtime.device import place
    from .runtime.images import Preprocess
    from .runtime.spade import SpadeConfig
    from .runtime.threads import set_threads

    if model is None:
        from .bench.models import lite0_onnx

        model = lite0_onnx()
    set_threads(threads)
    placed = place(model, device, threads, fp16)
    click.echo(f"device: {placed.why}", err=True)
    config = SpadeConfig(**scoring_overrides(**scoring))
    results = run_eval(
        placed.backend,
        data,
        out,
        config,
        Preprocess(placed.backend.info.input_size, crop),
        echo=click.echo,
        scorer=placed.scorer,
    )
    for r in results:
        m = r.metrics
        click.echo(f"{r.name}: image AUROC {m['image_auroc']}, pixel AUROC {m['pixel_auroc']}, AUPRO {m['aupro']}")
    click.echo(f"report: {out / 'report.html'} and {out / 'report.md'}")


@main.command()
@click.option(
    "--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True, help="fp32 model from 'export'."
)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Model file to write."
)
@click.option("--precision", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True)
@click.option(
    "--images", "-i", type=click.Path(exists=True, file_okay=False), help="Normal images to calibrate on (int8)."
)
@click.option(
    "--count", type=click.IntRange(1), default=64, show_default=True, help="Calibration images used (a seeded sample)."
)
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True)
@click.option(
    "--quantizer",
    type=click.Choice(["ort", "modelopt"]),
    default="ort",
    show_default=True,
    help="ONNX Runtime's quantization tools, or NVIDIA ModelOpt (extra 'modelopt').",
)
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), default=99.999, show_default=True)
@click.option("--exclude", multiple=True, help="Node kept in float (repeatable); see --list-nodes.")
@click.option(
    "--auto-exclude",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Keep this many of the Conv layers with the largest local error in float.",
)
@click.option(
    "--target-cosine",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.99,
    show_default=True,
    help="Keep the fewest leading Conv layers in float that hold every output's mean feature cosine "
    "to the fp32 model at this value on 8 calibration images (0: quantize them all).",
)
@click.option(
    "--weight-bits",
    type=click.Choice(["7", "8"]),
    default="7",
    show_default=True,
    help="7: weights exact on every CPU; 8: full range, exact only with VNNI, AMX, Arm or a GPU (x86 "
    "CPUs without VNNI saturate: 'spade-edge calibrate' warns where that applies).",
)
@click.option("--crop/--no-crop", default=True, show_default=True)
@click.option(
    "--report",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a drift report here (features, latency; ELPV accuracy with --accuracy).",
)
@click.option(
    "--accuracy", is_flag=True, help="With --report: image and pixel AUROC of both models on the ELPV benchmarks."
)
@click.option("--limit", type=click.IntRange(1), help="With --accuracy: cap test images per set (quick look).")
@_friendly_errors
def calibrate(
    model,
    out,
    precision,
    images,
    count,
    method,
    quantizer,
    percentile,
    exclude,
    auto_exclude,
    target_cosine,
    weight_bits,
    crop,
    report,
    accuracy,
    limit,
):
    """Write a reduced-precision model: INT8 Q/DQ calibrated on normal images (symmetric, per-channel
    weights; TensorRT 10/11 and ONNX Runtime accept it) or FP16 for strongly typed TensorRT."""
    import onnx

    from .calibration.common import read_info
    from .runtime.images import Preprocess

    info = read_info(onnx.load(model, load_external_data=False))
    if precision == "int8":
        from .calibration.int8 import Int8Options, int8_from_onnx
        from .calibration.reader import calibration_images

        if not images:
            raise click.UsageError("--images is required for int8 calibration")
        paths = calibration_images(images, count)
        quantize = int8_from_onnx
        if quantizer == "modelopt":
            from .calibration.modelopt import int8_with_modelopt as quantize
        opts = Int8Options(
            method,
            percentile,
            tuple(exclude),
            auto_exclude,
            target_cosine=target_cosine if quantizer == "ort" else 0.0,
            weight_bits=int(weight_bits),
        )
        res = quantize(model, paths, out, opts, Preprocess(info.input_size, crop))
        kept = f"; kept in float: {', '.join(res.excluded)}" if res.excluded else ""
        click.echo(f"wrote {out}: int8 Q/DQ ({quantizer}), {method} on {len(paths)} images{kept}")
        if getattr(res, "probe_cosine", None):
            click.echo(
                f"first {res.leading_float} Conv layers kept in float for a feature cosine >= {target_cosine}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in res.probe_cosine.items())
            )
    else:
        from .calibration.fp16 import fp16_from_onnx

        fp16_from_onnx(model, out)
        click.echo(f"wrote {out}: fp16 (uint8 input, float32 outputs)")
    if report:
        from .bench.accuracy import split
        from .calibration.drift import drift_report
        from .datasets import elpv_cells
        from .runtime.features import backend_from_model

        ref, test = backend_from_model(model), backend_from_model(out)
        _, normal = split("mono", 0)
        acc = None
        if accuracy:
            from .bench.gallery import protocol_data, score_setting
            from .runtime.codec import Storage
            from .runtime.spade import SpadeConfig

            # K = 5: this compares precisions, not settings, at a tenth of the paper's K = 50 cost
            cfg = SpadeConfig(k_image=5, k_gallery=5)
            acc = {}
            for kind in ("mono", "poly"):
                scores = {
                    name: score_setting(
                        b, protocol_data(b, kind, limit=limit, echo=click.echo), Storage.exact(), cfg, f"{kind} {name}"
                    )
                    for name, b in (("fp32", ref), ("reduced", test))
                }
                acc[f"ELPV {kind} (K=5)"] = scores
        drift_report(ref, test, normal[:32], elpv_cells(1.0, "mono")[:32], report, acc)
        click.echo((report / "drift.md").read_text())


@main.command()
@click.option(
    "--model",
    "-m",
    type=click.Path(exists=True, dir_okay=False),
    help="Also open this model (ONNX or engine) on --device and say where it runs and why.",
)
@device_option
@_friendly_errors
def devices(model, device, fp16):
    """What this machine offers spade-edge: the CPU (instruction sets, INT8 kernel, pixel scorer),
    CUDA devices, ONNX Runtime's providers, TensorRT, CuPy and pycuda."""
    import importlib.metadata
    import importlib.util

    from .runtime import cpu
    from .runtime.device import ort_providers
    from .runtime.gpu import cupy_usable, gpu_identity
    from .runtime.scoring import cpu_scorer

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    click.echo(f"cpu: {cpu.summary()}; pixel scorer {cpu_scorer().name}")
    try:
        gpu = gpu_identity(0)
        click.echo(f"gpu 0: {gpu['name']} (compute capability {gpu['compute_capability']})")
    except Exception as exc:  # noqa: BLE001 - reported, not raised: this command describes the machine
        click.echo(f"gpu: none ({exc})")
    ort = version("onnxruntime") or version("onnxruntime-gpu")
    click.echo(f"onnxruntime: {ort or 'not installed'}; providers {', '.join(ort_providers()) or '-'}")
    trt = importlib.util.find_spec("tensorrt") is not None
    click.echo(f"tensorrt: {'installed' if trt else 'not installed'}")
    ok, why = cupy_usable(0)
    click.echo(f"cupy: {'usable (CUDA scorer)' if ok else why}")
    click.echo(f"pycuda: {'installed' if importlib.util.find_spec('pycuda') else 'not installed'}")
    if model:
        from .runtime.device import place

        placed = place(model, device, fp16=fp16)
        click.echo(f"{model} on --device {device}: {placed.why}")
        placed.backend.close()


def engine_build_options(fn):
    """The options of an engine build, the same for the Python build and for trtexec's."""
    opts = [
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True),
        click.option(
            "--max-batch",
            type=click.IntRange(1),
            default=8,
            show_default=True,
            help="Optimization profile: batch 1..N.",
        ),
        click.option("--workspace-mb", type=click.IntRange(1), default=1024, show_default=True),
        click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache kept between builds."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


_ONNX_HELP = "ONNX model (fp32; FP16 / INT8 Q/DQ from 'calibrate' for those precisions on TensorRT 11)."


@main.command("build-engine")
@click.option("--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True, help=_ONNX_HELP)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Engine file to write."
)
@engine_build_options
@_friendly_errors
def build_engine(model, out, precision, max_batch, workspace_mb, timing_cache):
    """Build a TensorRT engine on this machine's GPU (TensorRT 10 and 11 handled by version), with
    a sidecar recording the model and TensorRT version it came from. Prints the trtexec equivalent."""
    import importlib.util

    from .export.engine import engine_from_onnx
    from .export.trtexec import trtexec_command
    from .runtime.engine_record import parse_version

    args = (model, out, precision, max_batch, workspace_mb, timing_cache)
    if importlib.util.find_spec("tensorrt") is None:  # say what to run on the device anyway
        for v in ("10.3", "11.4"):
            click.echo(f"trtexec equivalent (TensorRT {v}): " + trtexec_command(*args, version=parse_version(v)))
    else:
        click.echo("trtexec equivalent: " + trtexec_command(*args))
    engine_from_onnx(*args)
    click.echo(f"wrote {out} and {out}.json")


@main.group()
def engine():
    """TensorRT engines built by trtexec (jetson/build-engine.sh): its command line, the sidecar
    record, and the check the runtime makes before it uses an engine."""


@engine.command("trtexec-args")
@click.option("--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True, help=_ONNX_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Engine file trtexec is to write.")
@engine_build_options
@click.option("--tensorrt-version", help="The TensorRT the command is for (default: the installed one).")
@_friendly_errors
def engine_trtexec_args(model, out, precision, max_batch, workspace_mb, timing_cache, tensorrt_version):
    """Print the trtexec arguments that build what 'build-engine' builds, one per line."""
    from .export.trtexec import trtexec_args
    from .runtime.engine_record import parse_version

    version = None if tensorrt_version is None else parse_version(tensorrt_version)
    click.echo("\n".join(trtexec_args(model, out, precision, max_batch, workspace_mb, timing_cache, version=version)))


@engine.command("sidecar")
@click.argument("engine_path", metavar="ENGINE", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model",
    "-m",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The ONNX model the engine was built from.",
)
@engine_build_options
@click.option("--tool", default="trtexec", show_default=True, help="What built the engine (recorded).")
@_friendly_errors
def engine_sidecar(engine_path, model, precision, max_batch, workspace_mb, timing_cache, tool):
    """Write ENGINE.json for an engine built elsewhere, with the options it was built with."""
    from .export.engine import build_options, write_sidecar
    from .export.trt_plans import build_plan
    from .runtime.engine_record import sidecar_path
    from .runtime.modelinfo import model_info_from_onnx

    plan = build_plan(precision, model_info_from_onnx(model).precision)
    write_sidecar(
        engine_path, model, precision, build_options(precision, max_batch, workspace_mb, timing_cache, plan, tool)
    )
    click.echo(str(sidecar_path(engine_path)))


@engine.command("check")
@click.argument("engine_path", metavar="ENGINE", type=click.Path(dir_okay=False))
@click.option(
    "--model", "-m", type=click.Path(exists=True, dir_okay=False), help="Also check it was built from this ONNX model."
)
@_friendly_errors
def engine_check(engine_path, model):
    """Refuse (exit 1) an engine that does not match its sidecar, its ONNX model, this TensorRT or
    this GPU, as the runtime does before it loads one."""
    from .runtime.engine_record import check_engine

    rec = check_engine(engine_path, model)
    click.echo(f"{engine_path}: ok ({rec['engine']['precision']}, TensorRT {rec['tensorrt']}, {rec['gpu']['name']})")


@main.group()
def bench():
    """Benchmarks that measure and print tables (and write them as JSON and Markdown)."""


@bench.command("accuracy")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="bench-results", show_default=True)
@click.option("--cell-types", default="mono,poly", show_default=True, help="Comma-separated ELPV cell types.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the gallery / test split.")
@click.option(
    "--pixel-images",
    type=click.IntRange(2),
    default=100,
    show_default=True,
    help="Normal and synthetic-defect cells each in the pixel-level benchmark.",
)
@click.option("--limit", type=click.IntRange(1), help="Cap test images per group (a quick look; not the protocol).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime.")
@_friendly_errors
def bench_accuracy(out, cell_types, seed, pixel_images, limit, threads):
    """ELPV image-level benchmark and synthetic-defect pixel-level benchmark with real Lite0
    weights (protocol in docs/results.md). Every K, kappa, pixel mode and level subset in one pass."""
    from .bench.accuracy import Protocol, markdown, run
    from .bench.models import lite0_onnx
    from .runtime.features import backend_from_model

    backend = backend_from_model(lite0_onnx(), threads=threads)
    proto = Protocol(cell_types=tuple(cell_types.split(",")), seed=seed, n_pixel=pixel_images, limit=limit)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in proto.cell_types:
        results.update(run(backend, Protocol(**{**proto.__dict__, "cell_types": (kind,)}), echo=click.echo))
        (out / f"elpv-{kind}.json").write_text(json.dumps({"protocol": proto.__dict__, **results[kind]}, indent=1))
    # tables over every cell type measured so far in this folder
    merged = {p.stem.split("-", 1)[1]: json.loads(p.read_text()) for p in sorted(out.glob("elpv-*.json"))}
    table = markdown(merged, [lv.name for lv in backend.info.levels], proto.ks)
    (out / "accuracy.md").write_text(table)
    click.echo(table)


@bench.command("gallery")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="bench-results", show_default=True)
@click.option("--cell-types", default="mono,poly", show_default=True, help="Comma-separated ELPV cell types.")
@click.option("--pixel-images", type=click.IntRange(2), default=100, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Cap test images per group (a quick look; not the protocol).")
@click.option("--settings", help="Comma-separated storage settings to measure (default: all; fp32 is always measured).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime.")
@scoring_options
@_friendly_errors
def bench_gallery(out, cell_types, pixel_images, limit, settings, threads, **scoring):
    """Every storage setting against fp32: bytes per normal image, load time, resident memory,
    image / pixel AUROC and AUPRO on the ELPV benchmarks; and the cost of loading a 1 GiB gallery."""
    from .bench.gallery import SETTINGS, big_gallery_load, markdown, run
    from .bench.models import lite0_onnx
    from .runtime.features import backend_from_model
    from .runtime.spade import SpadeConfig

    chosen = dict(SETTINGS)
    if settings:
        names = ["fp32"] + [n.strip() for n in settings.split(",") if n.strip() != "fp32"]
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            raise click.BadParameter(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
        chosen = {n: SETTINGS[n] for n in names}
    backend = backend_from_model(lite0_onnx(), threads=threads)
    config = SpadeConfig(**scoring_overrides(**scoring))
    kinds = tuple(cell_types.split(","))
    results = run(backend, config, chosen, cell_types=kinds, n_pixel=pixel_images, limit=limit, echo=click.echo)
    big = big_gallery_load()
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(kinds)
    (out / f"gallery-{tag}.json").write_text(
        json.dumps({"config": config.to_dict(), "results": results, "big": big}, indent=1)
    )
    table = markdown(results, big)
    (out / f"gallery-{tag}.md").write_text(table)
    click.echo(table)


# the benches' feature shapes (bench speed, bench gpu)
_shapes_option = click.option(
    "--shapes",
    type=click.Choice(["real", "tiny"]),
    default="real",
    show_default=True,
    help="tiny: made-up small feature shapes instead of the backbones', to check the bench itself in seconds.",
)


@bench.command("speed")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="bench-results", show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Runs per measurement (median).")
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="Threads for BLAS, OpenMP (faiss, torch) and ONNX Runtime alike, set in each measuring process.",
)
@click.option("--quick", is_flag=True, help="K = 5 only, no backbones, no end to end (a smoke run).")
@_shapes_option
@_friendly_errors
def bench_speed(out, repeats, threads, quick, shapes):
    """Pixel scoring against faiss-cpu IndexFlatL2, torch.cdist + topk and plain numpy at SPADE's
    shapes; ONNX Runtime fp32 / int8 against PyTorch eager; WRN50x2 end to end. One run, ratios.
    Every figure is measured in a fresh Python process of its own, as a user's process runs it: no
    other library's thread pool beside the one measured; the CPU's instruction sets head the table."""
    from .bench import speed

    table_shapes = speed.TINY_SHAPES if shapes == "tiny" else speed.SHAPES
    main_shapes = "tiny" if shapes == "tiny" else "wide_resnet50_2"  # the GEMM ceiling's and the profile's
    fine, d = table_shapes[main_shapes][0], sum(s[2] for s in table_shapes[main_shapes])
    r = {
        "machine": speed.in_fresh_process("machine", threads),
        "threads": threads,
        "gemm_gflops": speed.in_fresh_process("gemm_rate", threads, p=fine[0] * fine[1], d=d)["value"],
    }
    if not quick:
        click.echo("end to end ...")
        r["end_to_end"] = speed.end_to_end(threads=threads)
    r["scoring"] = {}
    for backbone, levels in table_shapes.items():
        for k in (5,) if quick else (5, 50):
            click.echo(f"scoring {backbone} K={k} ...")
            r["scoring"][f"{backbone} concat K={k}"] = speed.scoring(
                backbone, k, repeats if k == 5 else 1, threads=threads, shapes=levels
            )
    r["per_level"] = {}
    if shapes != "tiny" and not quick:  # Lite0's per-level scoring: a full fp32 gallery, the default storage
        for storage in speed.STORAGES:
            click.echo(f"scoring efficientnet_lite0 per-level K=50, {storage} gallery ...")
            r["per_level"][f"efficientnet_lite0 per-level K=50, {storage} gallery"] = speed.per_level(
                "efficientnet_lite0", 50, storage, repeats, threads=threads
            )
    click.echo("profile of concat scoring ...")
    r["profile"] = speed.in_fresh_process(
        "profile_concat", threads, k=5 if quick else 50, backbone=main_shapes, shapes=table_shapes[main_shapes]
    )
    if not quick:
        click.echo("backbones ...")
        r["backbones"] = speed.backbones(repeats, threads=threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(r, indent=1))
    table = speed.markdown(r)
    (out / "speed.md").write_text(table)
    click.echo(table)


@bench.command("gpu")
@click.option(
    "--quick", is_flag=True, help="WRN50x2 concat K=50 and per-level K=5, Lite0 concat K=5, end to end at K=5."
)
@click.option("--device", "device_id", type=click.IntRange(0), default=0, show_default=True, help="CUDA device.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results here."
)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed runs per figure (median).")
@_shapes_option
@click.option("--end-to-end/--no-end-to-end", "e2e", default=True, show_default=True, help="One image end to end.")
@click.option("--paper", is_flag=True, help="Print the on-paper estimate for Jetson Orin (no GPU needed) and stop.")
def bench_gpu(quick, device_id, json_path, repeats, shapes, e2e, paper):
    """Pixel scoring on the GPU: the CUDA scorer against torch matmul + topk (fp32 and fp16) on the
    same device and data, with the device's fp16 GEMM rate, launches per image and a check against a
    float64 search; one image end to end. Exits 3, measuring nothing, where no GPU is usable."""
    from .bench import gpu, gpu_paper

    if paper:
        r = gpu_paper.paper_estimate()
        table = gpu_paper.paper_markdown(r)
    else:
        try:
            r = gpu.run(device_id, quick=quick, shapes=shapes, repeats=repeats, e2e=e2e, echo=click.echo)
        except gpu.NoGpuError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(gpu.NO_GPU_EXIT)
        table = gpu.markdown(r)
    if json_path:
        json_path.write_text(json.dumps(r, indent=1, default=str))
    click.echo(table)


@bench.group("jetson")
def bench_jetson():
    """The Python half of jetson/bench.sh (which brings the Jetson tools: tegrastats, nvpmodel,
    jetson_clocks): latency over a folder of images, then one JSON result with power and board."""


@bench_jetson.command("run")
@click.option(
    "--model", "-m", type=click.Path(exists=True, dir_okay=False), required=True, help="ONNX model or engine."
)
@click.option("--gallery", "-g", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--images", "-i", type=click.Path(exists=True, file_okay=False), required=True)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Latency JSON to write."
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime and the scorer.")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed predictions first.")
@click.option("--repeat", type=click.IntRange(1), default=1, show_default=True, help="Passes over the images.")
@device_option
@_friendly_errors
def bench_jetson_run(model, gallery, images, out, threads, warmup, repeat, device, fp16):
    """Time the detector's predict on every image of a folder (read into memory first: disk is not
    timed): latency percentiles, stage medians, throughput, verdicts."""
    from .bench.jetson import run_latency, summary

    res = run_latency(model, gallery, images, device, threads, warmup, repeat, fp16=fp16)
    out.write_text(json.dumps(res, indent=1) + "\n")
    click.echo(summary(out, res), err=True)


@bench_jetson.command("report")
@click.option("--latency", type=click.Path(exists=True, dir_okay=False), required=True, help="What 'run' wrote.")
@click.option("--tegrastats", help="tegrastats log file (absent: not available).")
@click.option("--nvpmodel", help="File holding 'nvpmodel -q' output.")
@click.option("--clocks", help="File holding 'jetson_clocks --show' output.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Extra fields (L4T release, board...).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True)
@_friendly_errors
def bench_jetson_report(latency, tegrastats, nvpmodel, clocks, meta, out):
    """Merge the latency, a tegrastats log and the power mode into one JSON result."""
    from .bench.jetson import report_files, summary

    res = report_files(latency, tegrastats, nvpmodel, clocks, dict(kv.split("=", 1) for kv in meta if "=" in kv))
    out.write_text(json.dumps(res, indent=1) + "\n")
    click.echo(summary(out, res), err=True)


# the inspection service and the watch folder live in spade_edge.service, the line adapters in spade_edge.line
from .line.cli import line  # noqa: E402
from .service.cli import serve, watch  # noqa: E402

main.add_command(serve)
main.add_command(watch)
main.add_command(line)
