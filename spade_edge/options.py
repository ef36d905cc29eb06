"""Command-line options shared by the click commands (spade_edge/cli.py, service/cli.py, line/cli.py):
every device, thread and scoring option means the same in every command that takes it."""

from __future__ import annotations

import click


class DeviceType(click.ParamType):
    """auto, cpu, cuda[:N], tensorrt[:N] (runtime/device.py)."""

    name = "auto|cpu|cuda[:N]|tensorrt[:N]"

    def convert(self, value, param, ctx):
        from .runtime.device import parse_device

        try:
            parse_device(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


DEVICE_HELP = (
    "Where to run: cpu, cuda[:N] or tensorrt[:N] (GPU N), or auto: the best that starts here "
    "(TensorRT, then CUDA, then the CPU), said on stderr. A .engine file runs on TensorRT."
)


def device_option(fn):
    """--device and --fp16, for the commands that run a model."""
    fn = click.option(
        "--fp16",
        is_flag=True,
        help="Let ONNX Runtime's TensorRT provider run an fp32 model in "
        "half precision (an engine's precision is fixed when it is built).",
    )(fn)
    return click.option("--device", type=DeviceType(), default="auto", show_default=True, help=DEVICE_HELP)(fn)


def threads_option(fn):
    """--threads, for the commands that run a model."""
    return click.option("--threads", type=click.IntRange(1), help="CPU threads for ONNX Runtime and the scorer.")(fn)


SCORING_KEYS = ("k_image", "k_gallery", "kappa", "mode", "levels", "score")


def scoring_options(fn):
    """Options of SPADE's scoring; unset ones keep the gallery's stored settings. The same names
    (with underscores) are the scoring keys of the line's TOML file."""
    opts = [
        click.option("--k-image", type=click.IntRange(1), help="Nearest normal images averaged into the image score."),
        click.option(
            "--k-gallery", type=click.IntRange(1), help="Nearest normal images whose pixels form the pixel gallery."
        ),
        click.option("--kappa", type=click.IntRange(1), help="Nearest gallery pixels averaged per test pixel."),
        click.option(
            "--mode",
            type=click.Choice(["concat", "per-level"]),
            help="concat: the paper's concatenated pyramid; per-level: score levels apart, average.",
        ),
        click.option("--levels", help="Comma-separated subset of pyramid levels (default: all)."),
        click.option(
            "--score",
            type=click.Choice(["image", "max-pixel", "top-pixels", "combined"]),
            help="Image score: the kNN stage, the anomaly map's maximum, the mean of its top 1%, "
            "or kNN stage + top 1% over their normal medians (default).",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def scoring_overrides(k_image=None, k_gallery=None, kappa=None, mode=None, levels=None, score=None) -> dict:
    """The set scoring options as :class:`~spade_edge.runtime.spade.SpadeConfig` keyword arguments
    (``levels``: comma-separated text, or a list of names)."""
    if isinstance(levels, str):
        levels = tuple(v.strip() for v in levels.split(",") if v.strip()) or None
    elif levels is not None:
        levels = tuple(levels) or None
    d = {"k_image": k_image, "k_gallery": k_gallery, "kappa": kappa, "mode": mode, "levels": levels, "score": score}
    return {k: v for k, v in d.items() if v is not None}
