"""trtexec stand-in: the options jetson/build-engine.sh passes, parsed as trtexec spells them, and
the engine built through the tensorrt stand-in's builder API (the folder above this one must be on
PYTHONPATH: tests.standins.standins_env does it). An option trtexec does not know, or a malformed
one, ends the build with an error, as the real trtexec does."""

import re
import sys


def shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, dims = text.rsplit(":", 1)
    return name, tuple(int(d) for d in dims.split("x"))


def main(argv: list[str]) -> int:
    import tensorrt as trt

    opts, flags = {}, set()
    for arg in argv:
        m = re.fullmatch(r"--(onnx|saveEngine|minShapes|optShapes|maxShapes|memPoolSize|timingCacheFile)=(.+)", arg)
        if m:
            opts[m.group(1)] = m.group(2)
        elif arg in ("--fp16", "--int8", "--stronglyTyped"):
            flags.add(arg[2:])
        else:
            print(f"[E] Unknown option: {arg}", file=sys.stderr)
            return 1
    if "onnx" not in opts or "saveEngine" not in opts:
        print("[E] Model missing or format not recognized", file=sys.stderr)
        return 1
    major = int(trt.__version__.split(".")[0])
    if major >= 11 and flags & {"fp16", "int8"}:  # TensorRT 11's trtexec dropped them
        print(f"[E] Unknown option: --{sorted(flags & {'fp16', 'int8'})[0]}", file=sys.stderr)
        return 1

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            print(f"[{int(severity)}] {msg}", file=sys.stderr)

    logger = Logger()
    builder = trt.Builder(logger)
    bits = (
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if "stronglyTyped" in flags
        else (1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    )
    network = builder.create_network(bits)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(opts["onnx"]):
        return 1
    config = builder.create_builder_config()
    if "memPoolSize" in opts:
        pool, size = opts["memPoolSize"].split(":")
        assert pool == "workspace" and size.endswith("M"), opts["memPoolSize"]
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(size[:-1]) << 20)
    for flag in ("fp16", "int8"):
        if flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    if "minShapes" in opts:
        profile = builder.create_optimization_profile()
        name, lo = shape(opts["minShapes"])
        profile.set_shape(
            name,
            lo,
            shape(opts.get("optShapes", opts["minShapes"]))[1],
            shape(opts.get("maxShapes", opts["minShapes"]))[1],
        )
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        print("[E] Engine could not be created from network", file=sys.stderr)
        return 1
    with open(opts["saveEngine"], "wb") as f:
        f.write(bytes(engine))
    print(f"[I] Engine built and saved to {opts['saveEngine']} (stand-in)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
