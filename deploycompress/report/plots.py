"""The report's figures as PNG bytes. matplotlib is imported here only, with the Agg canvas
(no display, no pyplot global state), so importing the package stays cheap."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .schema import Report

__all__ = ["PLOTS", "render_plots"]

_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def latency_plot(report: "Report") -> bytes | None:
    """Distribution of per-batch latency for every backend, precision and batch size (box plot)."""
    records = [r for r in report.latency if r.samples_ms]
    if not records:
        return None
    fig = _figure(7.5, 0.9 + 0.55 * len(records))
    ax = fig.add_subplot()
    parts = ax.boxplot([r.samples_ms for r in records], orientation="horizontal", showfliers=True, patch_artist=True, widths=0.6,
                       flierprops={"markersize": 3, "alpha": 0.5}, medianprops={"color": "black"})
    precisions = list(dict.fromkeys(f"{r.backend} {r.precision}" for r in records))
    for r, box in zip(records, parts["boxes"]):
        box.set_facecolor(_COLOURS[precisions.index(f"{r.backend} {r.precision}") % len(_COLOURS)])
        box.set_alpha(0.7)
    for i, r in enumerate(records, start=1):
        ax.plot([r.p99_ms], [i], marker="|", markersize=14, color="black")
    ax.set_yticks(range(1, len(records) + 1), [r.label for r in records])
    lo = min(min(r.samples_ms) for r in records)
    hi = max(max(r.samples_ms) for r in records)
    if lo > 0 and hi / lo > 20:  # batch sizes far apart: a linear axis hides the small ones
        ax.set_xscale("log")
    ax.set_xlabel("latency per batch (ms); | marks p99")
    ax.set_title("Latency distribution")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def layers_plot(report: "Report", top: int = 15) -> bytes | None:
    """The ``top`` slowest layers of the deployed graph."""
    layers = report.layers[:top]
    if not layers:
        return None
    fig = _figure(7.5, 1.0 + 0.3 * len(layers))
    ax = fig.add_subplot()
    labels = [f"{l.name[:40]} ({l.op_type})" for l in layers][::-1]
    ax.barh(labels, [l.mean_ms for l in layers][::-1], color=_COLOURS[0])
    ax.set_xlabel("mean time per run (ms)")
    ax.set_title(f"Per-layer time, top {len(layers)}")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def sizes_plot(report: "Report") -> bytes | None:
    """Params, FLOPs and file size at each stage, relative to the first stage (absolute numbers on the bars)."""
    metrics = [m for m in ("params", "flops", "size_bytes") if any(getattr(s, m) for s in report.sizes)]
    if len(report.sizes) < 1 or not metrics:
        return None
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / len(report.sizes)
    for i, stage in enumerate(report.sizes):
        xs, ys, texts = [], [], []
        for j, m in enumerate(metrics):
            base = next((getattr(s, m) for s in report.sizes if getattr(s, m)), None)
            value = getattr(stage, m)
            if value is None or not base:
                continue
            xs.append(j + i * width)
            ys.append(value / base)
            texts.append(_short(value))
        bars = ax.bar(xs, ys, width=width, label=stage.stage, color=_COLOURS[i % len(_COLOURS)])
        for bar, text in zip(bars, texts):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(report.sizes) - 1) / 2 for j in range(len(metrics))], [m.replace("_", " ") for m in metrics])
    ax.set_ylabel(f"relative to {report.sizes[0].stage}")
    ax.set_ylim(0, 1.25)
    ax.set_title("Params, FLOPs and size")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def accuracy_plot(report: "Report") -> bytes | None:
    """Accuracy change of each deployed model against its reference, in points."""
    if not report.accuracy:
        return None
    fig = _figure(7.5, 1.0 + 0.45 * len(report.accuracy))
    ax = fig.add_subplot()
    deltas = [100.0 * a.delta for a in report.accuracy]
    labels = [f"{a.label} vs {a.reference_label} ({a.metric})" for a in report.accuracy]
    ax.barh(labels, deltas, color=[_COLOURS[2] if d >= 0 else _COLOURS[3] for d in deltas])
    for y, (d, a) in enumerate(zip(deltas, report.accuracy)):
        ax.annotate(f"{d:+.2f} pt ({100 * a.value:.2f}%)", (d, y), ha="left" if d >= 0 else "right", va="center", fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    lim = max(1.0, max(abs(d) for d in deltas) * 1.6)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("accuracy delta (percentage points)")
    ax.set_title("Accuracy against the reference")
    return _png(fig)


def _short(value: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= div:
            return f"{value / div:.2f}{unit}"
    return f"{value:g}"


#: section id -> (title, plotting function)
PLOTS: dict[str, tuple[str, Callable[["Report"], bytes | None]]] = {
    "latency": ("Latency distribution", latency_plot),
    "layers": ("Per-layer time", layers_plot),
    "sizes": ("Params, FLOPs and size", sizes_plot),
    "accuracy": ("Accuracy deltas", accuracy_plot),
}


def render_plots(report: "Report") -> dict[str, bytes]:
    """Every plot the report has data for, keyed by section id."""
    out = {}
    for key, (_, fn) in PLOTS.items():
        png = fn(report)
        if png is not None:
            out[key] = png
    return out
