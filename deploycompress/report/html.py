"""report.html: one self-contained file (inline CSS, plots as base64 PNG) that opens anywhere offline."""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING, Any, Sequence

from .plots import PLOTS, render_plots
from .summary import performance_summary

if TYPE_CHECKING:
    from .schema import Report

__all__ = ["render_html"]

_TABLE_LAYERS = 20
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:980px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem} table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left} img{max-width:100%;display:block;margin:.5rem 0}
pre{background:#f7f7f7;padding:.6rem;white-space:pre-wrap;font-size:.8rem}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _img(key: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="plot-{key}" alt="{html.escape(PLOTS[key][0])}" src="data:image/png;base64,{data}">'


def render_html(report: "Report") -> str:
    plots = render_plots(report)
    esc = html.escape
    sections = [
        f"<h1>{esc(report.name)}: {esc(report.backend)} {esc(report.precision)}</h1>",
        f'<p class="meta">report version {report.version}, created {esc(report.created)}</p>',
    ]
    if report.latency:
        sections.append("<h2>Latency</h2>")
        sections.append(
            _table(
                ["backend", "precision", "batch", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "samples/s", "iterations"],
                [[r.backend, r.precision, r.batch_size, r.mean_ms, r.p50_ms, r.p90_ms, r.p95_ms, r.p99_ms, r.throughput, r.iterations] for r in report.latency],
            )
        )
        if "latency" in plots:
            sections.append(_img("latency", plots["latency"]))
        sections.append(f"<pre>{esc(performance_summary(report.latency))}</pre>")
    if report.layers:
        sections.append("<h2>Per-layer time</h2>")
        if "layers" in plots:
            sections.append(_img("layers", plots["layers"]))
        shown = report.layers[:_TABLE_LAYERS]
        sections.append(_table(["layer", "op", "mean ms", "calls"], [[l.name, l.op_type, l.mean_ms, l.calls] for l in shown]))
        if len(report.layers) > len(shown):
            sections.append(f'<p class="meta">{len(report.layers) - len(shown)} more layers in report.json</p>')
    if report.sizes:
        sections.append("<h2>Params, FLOPs and size</h2>")
        sections.append(_table(["stage", "params", "FLOPs", "bytes"], [[s.stage, s.params, s.flops, s.size_bytes] for s in report.sizes]))
        if "sizes" in plots:
            sections.append(_img("sizes", plots["sizes"]))
    if report.accuracy or report.fidelity:
        sections.append("<h2>Accuracy</h2>")
        if report.accuracy:
            sections.append(
                _table(
                    ["model", "metric", "value", "reference", "reference value", "delta (pt)"],
                    [[a.label, a.metric, a.value, a.reference_label, a.reference_value, 100 * a.delta] for a in report.accuracy],
                )
            )
        if "accuracy" in plots:
            sections.append(_img("accuracy", plots["accuracy"]))
        if report.fidelity:
            sections.append(
                _table(
                    ["model", "output", "reference", "max |diff|", "cosine", "top-1 agreement"],
                    [[f.label, f.output, f.reference_label, f.max_abs_error, f.cosine_similarity, f.top1_agreement] for f in report.fidelity],
                )
            )
    if report.qdq:
        q = report.qdq
        sections.append(f"<h2>QDQ graph ({esc(str(q.get('target')))})</h2>")
        sections.append(_table(["weighted ops in int8", "weighted ops in float", "lint findings"],
                               [[q.get("int8_weighted_ops"), q.get("float_weighted_ops"), len(q.get("lint", []))]]))
        if q.get("lint"):
            sections.append(_table(["severity", "node", "rule", "message"], [[f["severity"], f["node"], f["rule"], f["message"]] for f in q["lint"]]))
        if q.get("skipped_calibration"):
            sections.append(_table(["module", "kind", "skipped because"], [[s["module"], s["kind"], s["reason"]] for s in q["skipped_calibration"]]))
    if report.steps:
        sections.append("<h2>Build steps</h2>")
        sections.append(_table(["step", "seconds"], [[k, v] for k, v in report.steps.items()]))
    if report.notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    if report.environment:
        env = report.environment
        rows = [[k, v] for k, v in (env.get("versions") or {}).items()]
        rows += [[f"host {k}", v] for k, v in (env.get("host") or {}).items()]
        if env.get("gpu"):
            rows += [[f"gpu {k}", v] for k, v in env["gpu"].items()]
        sections.append("<h2>Environment</h2>" + _table(["item", "value"], rows))
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(report.name)} report</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
