"""``spade-edge serve`` and ``spade-edge watch``: plain click commands, registered on the main
group with ``main.add_command`` (and runnable alone as ``python -m spade_edge.service``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from ..options import device_option, scoring_options, scoring_overrides, threads_option


def _model_options(fn):
    """Model, gallery, device, threads and the scoring settings (the same options as ``infer``)."""
    opts = [
        click.option(
            "--model",
            "-m",
            type=click.Path(exists=True, dir_okay=False),
            required=True,
            help="ONNX model (exported by 'spade-edge export'), or a TensorRT engine (.engine).",
        ),
        click.option(
            "--gallery",
            "-g",
            type=click.Path(exists=True, dir_okay=False),
            required=True,
            help="Gallery of normal parts built with this model.",
        ),
        device_option,
        threads_option,
        scoring_options,
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
            help="debug also logs every request.",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _load_options(device, fp16, threads, **scoring) -> dict:
    """``Detector.load`` keyword arguments from the model options."""
    return {"device": device, "fp16": fp16, "threads": threads, **scoring_overrides(**scoring)}


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter("use WIDTHxHEIGHT, e.g. 2448x2048") from None
    return w, h


def _on_signals(handler, *signums) -> None:
    for s in signums:
        signal.signal(s, handler)


@click.command()
@_model_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 or :: to accept the line's network).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option(
    "--queue-size",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Requests in the service at once; past that 503 with Retry-After.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(0.001),
    default=10.0,
    show_default=True,
    help="Seconds from arrival to answer (a request may ask for less with ?deadline_ms=).",
)
@click.option(
    "--max-mb", type=click.FloatRange(0.001), default=32.0, show_default=True, help="Largest request body, MiB."
)
@click.option(
    "--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True, help="Largest image, width x height."
)
@click.option("--expect-size", callback=_size, metavar="WxH", help="Refuse (422) images of any other size.")
@click.option(
    "--heatmap-cache",
    type=click.IntRange(0),
    default=32,
    show_default=True,
    help="Heat maps kept for GET /heatmaps/<id>.png.",
)
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Predictions run before the service reports ready.",
)
@click.option(
    "--reload",
    "reload_mode",
    type=click.Choice(["off", "local", "remote"]),
    default="local",
    show_default=True,
    help="Who may POST /reload (and send the text protocol's RELOAD): nobody, clients on this "
    "machine, or any client. SIGHUP always reloads.",
)
@click.option("--no-reload", "no_reload", is_flag=True, help="Same as --reload off.")
@click.option(
    "--reload-dir",
    "reload_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A POST /reload body may name model and gallery files under this directory (repeatable); "
    "without one, a reload re-reads the current files only.",
)
@click.option(
    "--reload-token",
    envvar="SPADE_EDGE_RELOAD_TOKEN",
    metavar="TOKEN",
    help="POST /reload then needs 'Authorization: Bearer TOKEN' (better set in the environment "
    "variable SPADE_EDGE_RELOAD_TOKEN than on the command line).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a whole request from its first byte (and that an idle connection is kept).",
)
@click.option(
    "--tcp",
    "tcp_port",
    type=click.IntRange(0, 65535),
    help="Also serve the TCP text protocol (TRIGGER, TA, GET, STATUS...: docs/line.md) on this port.",
)
@click.option(
    "--source",
    "source_spec",
    default="upload",
    show_default=True,
    metavar="upload|folder:DIR",
    help="Where a TCP trigger takes its image: POST /frames uploads, or the oldest file in DIR.",
)
@click.option(
    "--result-format",
    default="{code},{job},{verdict},{score:.6f}",
    show_default=True,
    help="TCP result line; fields code, job, verdict, judgement, score, threshold, latency_ms, image.",
)
@click.option("--ui", is_flag=True, help="Serve the operator's page at /ui/ (docs/service.md#the-operators-page).")
@click.option(
    "--ui-token",
    envvar="SPADE_EDGE_UI_TOKEN",
    metavar="TOKEN",
    help="Reviews, thresholds and rollbacks from the page need this token (without one the page is "
    "read-only); better set in SPADE_EDGE_UI_TOKEN than on the command line.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The page's audit log, reviews and reviewed images [default: GALLERY's folder/spade-edge-ui].",
)
@click.option(
    "--ui-results",
    type=click.IntRange(1, 10_000),
    default=50,
    show_default=True,
    help="Results the page keeps in memory with their images and maps (also at most 256 MiB of them).",
)
@click.option(
    "--ui-borderline",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="OK results scoring at least this share of the threshold also join the review queue (0: none).",
)
def serve(
    model,
    gallery,
    device,
    fp16,
    threads,
    log_level,
    host,
    port,
    queue_size,
    deadline,
    max_mb,
    max_pixels,
    expect_size,
    heatmap_cache,
    warmup,
    reload_mode,
    no_reload,
    reload_dirs,
    reload_token,
    read_timeout,
    tcp_port,
    source_spec,
    result_format,
    ui,
    ui_token,
    data_dir,
    ui_results,
    ui_borderline,
    **scoring,
):
    """Run the inspection service over HTTP.

    \b
    POST /inspect   image bytes (or multipart field 'image'); JSON verdict, score, threshold,
                    latency, nearest normal images; ?heatmap=1 (URL) or ?heatmap=inline
    GET  /health    200 once the model and gallery are loaded and warmed up, else 503
    GET  /metrics   Prometheus text: requests by outcome, latency histogram, queue depth
    POST /reload    JSON {"model": ..., "gallery": ...} (both optional, files under --reload-dir):
                    swap without dropping a request (SIGHUP reloads the same paths)
    POST /frames    with --tcp and --source upload: an image for the next TCP trigger
    GET  /ui/       with --ui: the operator's page (review, threshold, undo: docs/service.md)
    """
    from .inspector import InspectionService, ServiceConfig, sd_notify
    from .server import make_server

    _logging(log_level)
    log = logging.getLogger("spade_edge.service")
    try:
        cfg = ServiceConfig(
            queue_size=queue_size,
            deadline=deadline,
            max_bytes=int(max_mb * (1 << 20)),
            max_pixels=max_pixels,
            expect_size=expect_size,
            heatmap_cache=heatmap_cache,
            warmup=warmup,
            reload="off" if no_reload else reload_mode,
            reload_dirs=tuple(reload_dirs),
            reload_token=reload_token or None,
            read_timeout=read_timeout,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if tcp_port is not None:  # checked before anything loads
        from ..line.textproto import check_format

        try:
            check_format(result_format)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--result-format") from None
        if source_spec != "upload" and not (source_spec.startswith("folder:") and Path(source_spec[7:]).is_dir()):
            raise click.BadParameter(
                f"{source_spec!r}: use upload, or folder:DIR with an existing DIR", param_hint="--source"
            )
    if max_pixels > 89_478_485:  # Pillow's own bomb guard would refuse what we accept
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = max_pixels
    svc = InspectionService(cfg, **_load_options(device, fp16, threads, **scoring))
    station = None
    if ui:
        from .station import Station, StationConfig

        folder = data_dir or Path(gallery).resolve().parent / "spade-edge-ui"
        try:
            station = Station(svc, StationConfig(folder, ui_token or None, ui_results, borderline=ui_borderline))
        except OSError as exc:
            raise click.ClickException(f"--data-dir {folder}: {exc.strerror}") from exc
    try:
        httpd = make_server(svc, host, port, station)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    http_thread.start()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"spade-edge serve: listening on http://{shown}:{httpd.server_address[1]} (loading)", err=True)
    if station is not None:
        mode = "" if station.config.token else ", read-only: no --ui-token"
        click.echo(f"spade-edge serve: operator's page at http://{shown}:{httpd.server_address[1]}/ui/{mode}", err=True)

    stop = threading.Event()
    _on_signals(lambda *_: stop.set(), signal.SIGTERM, signal.SIGINT)

    def reload_same(*_):
        def run():
            try:
                svc.reload()
            except Exception as exc:  # noqa: BLE001 - logged; the service keeps its current model
                log.error("reload on SIGHUP failed, still serving the previous generation: %s", exc)

        threading.Thread(target=run, daemon=True).start()

    _on_signals(reload_same, signal.SIGHUP)
    code = 0
    text = None
    try:
        info = svc.load(model, gallery)
        if tcp_port is not None:
            text = _text_protocol(svc, host, tcp_port, source_spec, result_format, cfg.reload)
            click.echo(f"spade-edge serve: text protocol listening on {text.listening['tcp']}", err=True)
        click.echo("spade-edge serve: ready " + json.dumps(info), err=True)
        # systemd's watchdog (WatchdogSec=): pinged while the worker is not stuck on one image, so a
        # hung device gets the service restarted
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6
        last_ping = 0.0
        while not stop.wait(0.5):
            if watchdog and not svc.stalled and time.monotonic() - last_ping > watchdog / 3:
                sd_notify("WATCHDOG=1")
                last_ping = time.monotonic()
        log.info("stopping: finishing admitted requests")
    except Exception as exc:  # noqa: BLE001 - a failed first load ends the process (systemd restarts it)
        log.error("cannot start: %s", exc)
        code = 1
    finally:
        if text is not None:
            text.stop()
        svc.close(drain_timeout=cfg.deadline + 5)
        httpd.shutdown()
        httpd.server_close()
    if code:
        raise click.ClickException(f"cannot start: {svc.error}")


def _text_protocol(svc, host: str, port: int, spec: str, result_format: str, reload: str = "local"):
    """The TCP text protocol beside HTTP, its triggers fed by ``spec`` (upload | folder:DIR): the
    line's own adapters, as ``spade-edge line`` starts them from a [tcp] and a [source] section."""
    from ..line.config import section_defaults
    from ..line.run import LineAdapters

    source = {"type": "upload"} if spec == "upload" else {"type": "folder", "path": spec[len("folder:") :]}
    tcp = {**section_defaults("tcp"), "host": host, "port": port, "result_format": result_format}
    return LineAdapters(svc, {"tcp": tcp, "source": source, "reload": {"allow": reload}}).start()


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_model_options
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where results.jsonl and heatmaps/ go [default: FOLDER/spade-edge-out].",
)
@click.option(
    "--heatmaps",
    type=click.Choice(["all", "not-ok", "none"]),
    default="all",
    show_default=True,
    help="Which images get a heat-map PNG.",
)
@click.option("--interval", type=click.FloatRange(0.01), default=1.0, show_default=True, help="Seconds between scans.")
@click.option(
    "--settle",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Seconds a file must stay unchanged before it is read (still being copied otherwise).",
)
@click.option(
    "--give-up",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Seconds a file that does not decode must stay unchanged before it is recorded as failed "
    "(retried meanwhile: a copy may stall longer than --settle).",
)
@click.option("--recursive", is_flag=True, help="Also watch sub-folders.")
@click.option(
    "--done-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Move processed images here (failed ones to DONE_DIR/failed).",
)
@click.option("--once", is_flag=True, help="Process what is there now, then exit.")
@click.option("--quiet", "-q", is_flag=True, help="Do not echo result lines on stdout.")
def watch(
    folder,
    model,
    gallery,
    device,
    fp16,
    threads,
    log_level,
    out,
    heatmaps,
    interval,
    settle,
    give_up,
    recursive,
    done_dir,
    once,
    quiet,
    **scoring,
):
    """Score every image dropped into FOLDER, once, even across restarts.

    One JSON line per image in OUT/results.jsonl (and on stdout), heat maps in OUT/heatmaps/.
    A file is read once it has stopped changing; images already in results.jsonl are skipped.
    """
    from ..runtime.detector import Detector
    from ..runtime.errors import SpadeError
    from .watch import WatchConfig, Watcher

    _logging(log_level)
    try:
        det = Detector.load(model, gallery, **_load_options(device, fp16, threads, **scoring))
        cfg = WatchConfig(
            interval=interval, settle=settle, give_up=give_up, heatmaps=heatmaps, recursive=recursive, done_dir=done_dir
        )
        emit = None if quiet else (lambda rec: click.echo(json.dumps(rec)))
        watcher = Watcher(det, folder, out, cfg, emit)
    except (SpadeError, ValueError, OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    _on_signals(lambda *_: watcher.stop(), signal.SIGTERM, signal.SIGINT)
    with watcher:
        click.echo(
            f"spade-edge watch: {watcher.folder} -> {watcher.out} ({len(watcher.done)} images already recorded)",
            err=True,
        )
        if once:
            n = watcher.run_once()
        else:
            watcher.run()
            n = watcher.processed
    click.echo(f"spade-edge watch: {n} images processed", err=True)
