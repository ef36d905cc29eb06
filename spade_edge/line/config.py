"""The ``spade-edge line`` configuration file (TOML): which adapters run, on which ports, with
which image source. Checked whole at start: every problem is reported at once, by its place in
the file, before anything listens. docs/line.md shows a complete file."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import SCORING_KEYS, scoring_overrides
from ..runtime.device import parse_device
from ..runtime.errors import SpadeError
from .textproto import DEFAULT_FORMAT, check_format

# section -> key -> (types, default); a default of REQUIRED must be given
REQUIRED = object()
_HOST = ((str,), "127.0.0.1")  # every listener on loopback unless the file says where
SCHEMA: dict[str, dict[str, tuple]] = {
    "": {
        "model": ((str,), REQUIRED),
        "gallery": ((str,), REQUIRED),
        "device": ((str,), "auto"),
        "fp16": ((bool,), False),
        "threads": ((int,), 0),
        "log_level": ((str,), "info"),
        # the scoring options of infer / serve (--k-image ...): unset ones keep the gallery's
        "k_image": ((int,), None),
        "k_gallery": ((int,), None),
        "kappa": ((int,), None),
        "mode": ((str,), None),
        "levels": ((list, str), None),
        "score": ((str,), None),
    },
    "service": {"queue_size": ((int,), 8), "deadline": ((int, float), 10.0), "warmup": ((int,), 2)},
    "source": {
        "type": ((str,), REQUIRED),
        "path": ((str,), None),
        "settle": ((int, float), 0.2),
        "capacity": ((int,), 4),
        "pipeline": ((str,), "csi"),
        "sensor": ((int,), 0),
        "device": ((str,), "/dev/video0"),
        "width": ((int,), 1920),
        "height": ((int,), 1080),
        "fps": ((int,), 30),
        "camera": ((str,), None),
        "trigger": ((str,), "software"),
        "delay": ((int, float), 0.0),
    },
    "http": {"host": _HOST, "port": ((int,), 8080)},
    "tcp": {
        "host": _HOST,
        "port": ((int,), 2000),
        "result_format": ((str,), DEFAULT_FORMAT),
        "eol": ((str,), "\r\n"),
        "max_connections": ((int,), 32),
        "idle_timeout": ((int, float), 60.0),
    },  # seconds without a byte before a connection is closed; 0: never
    "modbus": {"host": _HOST, "port": ((int,), 502), "device_id": ((int,), 0), "ack_timeout": ((int, float), 10.0)},
    "opcua": {
        "host": _HOST,
        "port": ((int,), 4840),
        # security: unset = "none" on a loopback host, "Basic256Sha256_SignAndEncrypt" on any other
        # (spade_edge/line/opcua_security.py); paths start at this file's folder
        "security": ((str,), None),
        "certificate": ((str,), "opcua/server-cert.der"),
        "private_key": ((str,), "opcua/server-key.pem"),
        "trusted_certificates": ((str,), "opcua/trusted"),
        "allow_anonymous": ((bool,), True),
    },
    "mqtt": {
        "host": ((str,), REQUIRED),
        "port": ((int,), 1883),
        "topic": ((str,), "spade-edge"),
        "qos": ((int,), 1),
        "username": ((str,), None),
        "password": ((str,), None),
    },
    # who may reload (HTTP POST /reload, the text protocol's RELOAD): off | local (this machine) | remote;
    # dirs: the folders a /reload body may name files in (none: only the current files are re-read);
    # token: POST /reload then needs 'Authorization: Bearer <token>'
    "reload": {"allow": ((str,), "local"), "dirs": ((list,), ()), "token": ((str,), None)},
}
SOURCE_KEYS = {
    "folder": {"path", "settle"},
    "upload": {"capacity"},
    "fake": {"delay"},
    "gstreamer": {"pipeline", "sensor", "device", "width", "height", "fps"},
    "aravis": {"camera", "trigger"},
}
ADAPTERS = ("http", "tcp", "modbus", "opcua")


class ConfigError(SpadeError):
    """The configuration file is wrong; ``problems`` lists every finding."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(
            f"{path}: {len(problems)} problem{'s' * (len(problems) > 1)}:\n" + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass
class LineConfig:
    """A checked configuration: the top level and one dict per present section."""

    path: Path
    model: Path
    gallery: Path
    device: str = "auto"
    threads: int = 0
    log_level: str = "info"
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    fp16: bool = False
    scoring: dict[str, Any] = field(default_factory=dict)  # SpadeConfig overrides (k_image, mode, levels...)

    def section(self, name: str) -> dict[str, Any] | None:
        return self.sections.get(name)

    @property
    def adapters(self) -> list[str]:
        return [a for a in ADAPTERS if a in self.sections]

    def source_settings(self) -> dict[str, Any] | None:
        s = self.sections.get("source")
        if s is None:
            return None
        keep = SOURCE_KEYS[s["type"]]
        return {"type": s["type"], **{k: v for k, v in s.items() if k in keep and v is not None}}


def section_defaults(name: str) -> dict[str, Any]:
    """The settings of section ``name`` as a file that leaves them all out gets them."""
    return {k: default for k, (_, default) in SCHEMA[name].items() if default is not REQUIRED}


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6)
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def load_config(path: str | os.PathLike) -> LineConfig:
    """Read and check ``path``; raises :class:`ConfigError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, ["no such file"])
    try:
        raw = _toml(path)
    except Exception as exc:  # noqa: BLE001 - TOMLDecodeError says line and column
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    values = {"": _check_table("", top, problems)}
    for name, table in tables.items():
        if name not in SCHEMA or name == "":
            problems.append(f"[{name}]: unknown section{_suggest(name, [s for s in SCHEMA if s])}")
            continue
        values[name] = _check_table(name, table, problems)
    base = path.parent
    t = values[""]
    for key in ("model", "gallery"):
        if isinstance(t.get(key), str) and not (base / t[key]).is_file():
            problems.append(f"{key} = {t[key]!r}: no such file (relative paths start at {base})")
    if isinstance(t.get("device"), str):
        try:
            parse_device(t["device"])
        except ValueError as exc:
            problems.append(f"device = {t['device']!r}: {exc}")
    if t.get("log_level") not in (None, "debug", "info", "warning", "error"):
        problems.append(f"log_level = {t['log_level']!r}: one of debug, info, warning, error")
    scoring = _check_scoring(t, problems)
    _check_sections(values, base, problems)
    if problems:
        raise ConfigError(path, problems)
    return LineConfig(
        path,
        base / t["model"],
        base / t["gallery"],
        t["device"],
        t["threads"],
        t["log_level"],
        {k: v for k, v in values.items() if k},
        t["fp16"],
        scoring,
    )


def _check_scoring(t: dict, problems: list[str]) -> dict:
    """The scoring keys, checked as ``SpadeConfig`` checks them (levels against the model: at start)."""
    from ..runtime.spade import SpadeConfig

    levels = t.get("levels")
    if isinstance(levels, list) and not all(isinstance(v, str) for v in levels):
        problems.append(f"levels = {levels!r}: must be a list of level names")
        return {}
    scoring = scoring_overrides(**{k: t.get(k) for k in SCORING_KEYS})
    try:
        SpadeConfig(**scoring)
    except (ValueError, TypeError) as exc:
        problems.append(f"scoring: {exc}")
        return {}
    return scoring


def _check_table(name: str, table: dict, problems: list[str]) -> dict:
    schema, where = SCHEMA[name], f"[{name}] " if name else ""
    out = {}
    for key, value in table.items():
        if key not in schema:
            problems.append(f"{where}{key}: unknown setting{_suggest(key, list(schema))}")
            continue
        types, _ = schema[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            problems.append(f"{where}{key} = {value!r}: must be {' or '.join(t.__name__ for t in types)}")
            continue
        out[key] = value
    for key, (_, default) in schema.items():
        if key not in out:
            if default is REQUIRED:
                if key not in table:
                    problems.append(f"{where}{key}: required")
            else:
                out[key] = default
    return out


def _check_sections(values: dict, base: Path, problems: list[str]) -> None:
    ports: dict[int, str] = {}
    for name in ADAPTERS:
        s = values.get(name)
        if s is None or not isinstance(s.get("port"), int):
            continue
        if not 0 <= s["port"] <= 65535:
            problems.append(f"[{name}] port = {s['port']}: must be 0..65535")
        elif s["port"] and s["port"] in ports:
            problems.append(f"[{name}] port = {s['port']}: already used by [{ports[s['port']]}]")
        else:
            ports[s["port"]] = name
    if not any(a in values for a in ADAPTERS):
        problems.append("no adapter: add at least one of [http], [tcp], [modbus], [opcua]")
    svc = values.get("service", {})
    if svc.get("queue_size", 1) < 1 or svc.get("deadline", 1) <= 0:
        problems.append("[service] queue_size must be >= 1 and deadline > 0")
    src = values.get("source")
    if src is None:
        for a in ("tcp", "modbus", "opcua"):
            if a in values:
                problems.append(f"[{a}] triggers need an image source: add a [source] section")
    elif isinstance(src.get("type"), str):
        kind = src["type"]
        if kind not in SOURCE_KEYS:
            problems.append(
                f"[source] type = {kind!r}: one of {', '.join(SOURCE_KEYS)}{_suggest(kind, list(SOURCE_KEYS))}"
            )
        else:
            given = {k for k, v in src.items() if v != SCHEMA["source"][k][1]} - {"type"}
            for k in sorted(given - SOURCE_KEYS[kind]):
                problems.append(
                    f"[source] {k}: not a setting of a {kind} source ({', '.join(sorted(SOURCE_KEYS[kind]))})"
                )
            if kind == "folder":
                if not src.get("path"):
                    problems.append("[source] path: required for a folder source")
                elif not (base / src["path"]).is_dir():
                    problems.append(f"[source] path = {src['path']!r}: no such folder")
                else:
                    src["path"] = str(base / src["path"])
            if kind == "upload" and "http" not in values:
                problems.append("[source] type = 'upload' receives images on POST /frames: add an [http] section")
    tcp = values.get("tcp")
    if tcp:
        try:
            check_format(tcp.get("result_format", ""))
        except ValueError as exc:
            problems.append(f"[tcp] {exc}")
        if tcp.get("eol") not in ("\r\n", "\r", "\n"):
            problems.append(f"[tcp] eol = {tcp.get('eol')!r}: one of '\\r\\n', '\\r', '\\n'")
    if tcp and isinstance(tcp.get("idle_timeout"), (int, float)) and tcp["idle_timeout"] < 0:
        problems.append(f"[tcp] idle_timeout = {tcp['idle_timeout']}: seconds >= 0 (0: never)")
    if (reload := values.get("reload")) is not None:
        _check_reload(reload, base, problems)
    mqtt = values.get("mqtt")
    if mqtt and mqtt.get("qos") not in (0, 1, 2):
        problems.append(f"[mqtt] qos = {mqtt.get('qos')!r}: 0, 1 or 2")
    mb = values.get("modbus")
    if mb and not 0 <= mb.get("device_id", 0) <= 247:
        problems.append(f"[modbus] device_id = {mb['device_id']}: 0 (any) or 1..247")
    if opcua := values.get("opcua"):
        from .opcua_security import check_section  # no asyncua import

        problems.extend(f"[opcua] {p}" for p in check_section(opcua, base))


def _check_reload(reload: dict, base: Path, problems: list[str]) -> None:
    if reload.get("allow") not in ("off", "local", "remote"):
        problems.append(f"[reload] allow = {reload.get('allow')!r}: one of 'off', 'local', 'remote'")
    dirs = reload.get("dirs", ())
    if not all(isinstance(d, str) and d for d in dirs):
        problems.append(f"[reload] dirs = {dirs!r}: a list of folder paths")
    else:
        missing = [d for d in dirs if not (base / d).is_dir()]
        for d in missing:
            problems.append(f"[reload] dirs: {d!r}: no such folder (relative paths start at {base})")
        if not missing:
            reload["dirs"] = tuple(str(base / d) for d in dirs)
    if isinstance(reload.get("token"), str) and len(reload["token"].strip()) < 16:
        problems.append("[reload] token: at least 16 characters")


def reload_settings(cfg: LineConfig) -> dict:
    """The [reload] settings, with their defaults when the file has no such section."""
    return cfg.section("reload") or section_defaults("reload")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
