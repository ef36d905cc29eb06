"""The core speaks domain outcomes; HTTP maps them in service/server.py. The service and line
modules point one way: no import cycle, no private member of another module used."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spade_edge.service.inspector import InspectionService, ServiceConfig
from spade_edge.service.outcomes import (
    BadImage,
    Busy,
    DeadlinePassed,
    InferenceFailed,
    NotReady,
    TooLarge,
    Unsupported,
    WrongSize,
)
from spade_edge.service.server import http_error

from .conftest import ROOT

PACKAGES = ("service", "line")


@pytest.mark.parametrize(
    "outcome, status, label",
    [
        (Busy(3, 3, 2), 503, "queue_full"),
        (NotReady("starting", None, 2), 503, "not_ready"),
        (TooLarge("big"), 413, "too_large"),
        (Unsupported("gif"), 415, "unsupported_media_type"),
        (WrongSize("small"), 422, "unprocessable"),
        (BadImage("truncated"), 400, "bad_request"),
        (DeadlinePassed("while queued"), 504, "deadline"),
        (InferenceFailed(RuntimeError("device lost")), 500, "error"),
    ],
)
def test_http_maps_every_outcome(outcome, status, label):
    e = http_error(outcome)
    assert (e.status, e.outcome, e.message) == (status, label, outcome.message)
    assert e.retry_after == (2 if status == 503 else None)
    assert e.extra == ({"queue_depth": 3, "queue_capacity": 3} if isinstance(outcome, Busy) else {})


def test_the_service_refuses_with_outcomes_before_it_is_loaded():
    svc = InspectionService(ServiceConfig(retry_after=3), loader=lambda m, g: None)
    try:
        assert isinstance(svc.refusal(), NotReady)
        with pytest.raises(NotReady, match="service is starting") as e:
            svc.admit()
        assert e.value.state == "starting" and e.value.retry_after == 3
    finally:
        svc.close(drain_timeout=1)


def _modules():
    for pkg in PACKAGES:
        for f in sorted((ROOT / "spade_edge" / pkg).glob("*.py")):
            yield f"spade_edge.{pkg}" + ("" if f.stem == "__init__" else f".{f.stem}"), f


def test_no_private_member_of_another_object_is_used():
    found = []
    for _, f in _modules():
        for node in ast.walk(ast.parse(f.read_text())):
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            value = getattr(node, "value", None)
            own = isinstance(value, ast.Name) and value.id in ("self", "cls")
            # an override calling the base class's own hook is the class's business, not another object's
            parent = isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"
            if private and not (own or parent):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and any(a.name.startswith("_") for a in node.names):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}: imports a private name")
    assert not found, "\n".join(found)


def _imports(name: str, f: Path) -> set[str]:
    """Modules of service/ and line/ that ``f`` imports, at the top or lazily."""
    out, here = set(), name.split(".") if f.stem == "__init__" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(
                (here[: len(here) - node.level + 1] if node.level else []) + ([node.module] if node.module else [])
            )
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[:2] in (["spade_edge", p] for p in PACKAGES) and len(m.split(".")) > 2}


def test_service_and_line_modules_have_no_import_cycle():
    graph = {name: _imports(name, f) for name, f in _modules()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    core = (
        "spade_edge.service.outcomes",
        "spade_edge.service.config",
        "spade_edge.service.inputs",
        "spade_edge.service.inspector",
        "spade_edge.service.metrics",
    )
    for m in core:  # the core knows no protocol: neither HTTP nor the line
        assert not {d for d in graph[m] if d.endswith(".server") or ".line." in d}, m
