"""Evaluation reports: Markdown for the repository, one self-contained HTML page for people."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(results, backbone: str, config, preprocess) -> str:
    lines = [
        f"# spade-edge evaluation: {backbone}",
        "",
        f"Settings: {config.to_dict()}; pre-processing: {preprocess.to_dict()}.",
        "",
        "| category | images (defective) | image AUROC | image AUROC (max pixel) | pixel AUROC | AUPRO@0.3 | F1-max | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.metrics
        f1 = m["f1_max"]["f1"] if m["f1_max"] else None
        lines.append(
            f"| {r.name} | {m['images']} ({m['defective']}) | {_fmt(m['image_auroc'])} | "
            f"{_fmt(m['image_auroc_max_pixel'])} | {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} | "
            f"{_fmt(f1)} | {r.timings_ms['total']:.0f} |"
        )
    for r in results:
        lines += [
            "",
            f"## {r.name}",
            "",
            f"![curves]({r.curves['curves']})",
            "",
            "| defect type | images | image AUROC | image AUROC (max pixel) | pixel AUROC | AUPRO@0.3 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, t in r.per_type.items():
            lines.append(
                f"| {kind} | {t['images']} | {_fmt(t['image_auroc'])} | {_fmt(t['image_auroc_max_pixel'])} | "
                f"{_fmt(t['pixel_auroc'])} | {_fmt(t['aupro'])} |"
            )
        lines += ["", "Median timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items()), ""]
        for key, title in (
            ("false_positives", "Worst false positives (normal, highest scores)"),
            ("false_negatives", "Worst false negatives (defective, lowest scores)"),
        ):
            lines += [f"**{title}**", ""]
            lines += [f"- {w['image']} (score {w['score']:.3f})  \n  ![]({w['heatmap']})" for w in r.worst[key]]
            lines.append("")
    return "\n".join(lines) + "\n"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def html_page(results, backbone: str, config, preprocess, root: Path) -> str:
    """The same content with every picture embedded: one file to mail or archive."""
    e = html.escape
    head = [
        "category",
        "images (defective)",
        "image AUROC",
        "image AUROC (max pixel)",
        "pixel AUROC",
        "AUPRO@0.3",
        "F1-max",
        "ms / image",
    ]
    rows = []
    for r in results:
        m = r.metrics
        f1 = m["f1_max"]["f1"] if m["f1_max"] else None
        cells = [
            r.name,
            f"{m['images']} ({m['defective']})",
            _fmt(m["image_auroc"]),
            _fmt(m["image_auroc_max_pixel"]),
            _fmt(m["pixel_auroc"]),
            _fmt(m["aupro"]),
            _fmt(f1),
            f"{r.timings_ms['total']:.0f}",
        ]
        rows.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>spade-edge evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head><body>",
        f"<h1>spade-edge evaluation: {e(backbone)}</h1>",
        f"<p>Settings: {e(str(config.to_dict()))}; pre-processing: {e(str(preprocess.to_dict()))}</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>",
    ]
    for r in results:
        parts += [
            f"<h2>{e(r.name)}</h2>",
            _img(root / r.curves["curves"]),
            "<table><tr><th>defect type</th><th>images</th><th>image AUROC</th><th>image AUROC (max pixel)</th>"
            "<th>pixel AUROC</th><th>AUPRO@0.3</th></tr>",
        ]
        for kind, t in r.per_type.items():
            parts.append(
                f"<tr><td>{e(kind)}</td><td>{t['images']}</td><td>{_fmt(t['image_auroc'])}</td>"
                f"<td>{_fmt(t['image_auroc_max_pixel'])}</td><td>{_fmt(t['pixel_auroc'])}</td><td>{_fmt(t['aupro'])}</td></tr>"
            )
        parts.append(
            "</table><p>Median timings (ms): " + e(", ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items())) + "</p>"
        )
        for key, title in (("false_positives", "Worst false positives"), ("false_negatives", "Worst false negatives")):
            parts.append(f"<h3>{title}</h3>")
            for w in r.worst[key]:
                parts += [f"<p>{e(w['image'])} (score {w['score']:.3f})</p>", _img(root / w["heatmap"])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(results, out: Path, backbone: str, config, preprocess) -> tuple[Path, Path]:
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown(results, backbone, config, preprocess))
    page.write_text(html_page(results, backbone, config, preprocess, out))
    return md, page
