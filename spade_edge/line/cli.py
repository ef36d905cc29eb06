"""``spade-edge line CONFIG``: run the adapters a configuration file names."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

import click


@click.command("line")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Check the file and say what would run, then exit.")
def line(config: Path, check: bool):
    """Serve a production line from one TOML file: the TCP text protocol, Modbus TCP, OPC UA
    (OPC 40100 shape), HTTP and MQTT results, fed by a folder, an HTTP upload, a GStreamer
    pipeline or a GenICam camera. docs/line.md describes every setting and shows a full file.

    The file is checked whole before anything starts; every problem is listed.
    """
    from .config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    summary = {
        "model": str(cfg.model),
        "gallery": str(cfg.gallery),
        "scoring": cfg.scoring,
        "source": cfg.source_settings(),
        "adapters": {a: {k: v for k, v in cfg.sections[a].items() if k != "password"} for a in cfg.adapters},
        "mqtt": (mqtt := cfg.section("mqtt")) and {k: v for k, v in mqtt.items() if k != "password"},
    }
    if check:
        click.echo(json.dumps(summary, indent=2))
        click.echo(f"{config}: OK", err=True)
        return
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .run import LineRunner

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        runner = LineRunner(cfg).start()
    except Exception as exc:  # noqa: BLE001 - one sentence, not a traceback, for the operator
        raise click.ClickException(f"cannot start: {type(exc).__name__}: {exc}") from None
    for name, where in runner.listening.items():
        click.echo(f"spade-edge line: {name} listening on {where}", err=True)
    click.echo("spade-edge line: ready", err=True)
    try:
        stop.wait()
    finally:
        runner.stop()
