"""Command-line options shared by the click commands (spade_edge/cli.py, service/cli.py, line/cli.py)."""
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


DEVICE_HELP = ("Where to run: cpu, cuda[:N] or tensorrt[:N] (GPU N), or auto: the best that starts here "
               "(TensorRT, then CUDA, then the CPU), said on stderr. A .engine file runs on TensorRT.")


def device_option(fn):
    """--device and --fp16, for the commands that run a model."""
    fn = click.option("--fp16", is_flag=True, help="Let ONNX Runtime's TensorRT provider run an fp32 model in "
                      "half precision (an engine's precision is fixed when it is built).")(fn)
    return click.option("--device", type=DeviceType(), default="auto", show_default=True, help=DEVICE_HELP)(fn)
