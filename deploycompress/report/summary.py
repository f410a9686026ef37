"""A terminal summary in the spirit of trtexec's "Performance summary"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .schema import LatencyRecord, Report

__all__ = ["performance_summary", "report_summary"]


def performance_summary(records: Iterable["LatencyRecord"]) -> str:
    lines = []
    for r in records:
        lines.append(f"=== Performance summary: {r.backend} {r.precision}, batch {r.batch_size}, {r.iterations} iterations ===")
        lines.append(f"Throughput: {r.throughput:.2f} samples/s ({r.throughput / r.batch_size:.2f} qps)")
        lines.append(
            f"Latency: min = {r.min_ms:.4f} ms, max = {r.max_ms:.4f} ms, mean = {r.mean_ms:.4f} ms, "
            f"median = {r.p50_ms:.4f} ms, percentile(90%) = {r.p90_ms:.4f} ms, "
            f"percentile(95%) = {r.p95_ms:.4f} ms, percentile(99%) = {r.p99_ms:.4f} ms"
        )
    return "\n".join(lines)


def report_summary(report: "Report", top_layers: int = 5) -> str:
    """Latency, the slowest layers, sizes and accuracy: what a person reads after a build."""
    parts = [performance_summary(report.latency)] if report.latency else []
    if report.layers:
        parts.append(f"=== Slowest layers (top {min(top_layers, len(report.layers))}) ===")
        parts += [f"{l.mean_ms:9.4f} ms  {l.op_type:<16} {l.name}" for l in report.layers[:top_layers]]
    if report.sizes:
        parts.append("=== Model size ===")
        for s in report.sizes:
            fields = [f"{k} = {v:,}" for k, v in (("params", s.params), ("flops", s.flops), ("bytes", s.size_bytes)) if v is not None]
            parts.append(f"{s.stage}: " + ", ".join(fields))
    if report.accuracy or report.fidelity:
        parts.append("=== Accuracy ===")
        for a in report.accuracy:
            parts.append(
                f"{a.label}: {a.metric} = {100 * a.value:.2f}% ({100 * a.delta:+.2f} pt vs {a.reference_label} {100 * a.reference_value:.2f}%)"
            )
        for f in report.fidelity:
            agree = f", top-1 agreement = {100 * f.top1_agreement:.2f}%" if f.top1_agreement is not None else ""
            where = f" [{f.output}]" if f.output else ""
            parts.append(f"{f.label}{where} vs {f.reference_label}: max |diff| = {f.max_abs_error:.3g}, cosine = {f.cosine_similarity:.6f}{agree}")
    if report.qdq:
        q = report.qdq
        parts.append(f"=== QDQ ({q.get('target')}) ===")
        parts.append(f"weighted ops: {q.get('int8_weighted_ops', '?')} quantized, {q.get('float_weighted_ops', '?')} left in float; "
                     f"{len(q.get('lint', []))} lint finding(s)")
        parts += [f"  {f['severity']}: {f['node']} {f['rule']}: {f['message']}" for f in q.get("lint", [])[:10]]
        parts += [f"  skipped calibration {s['module']}.{s['kind']}: {s['reason']}" for s in q.get("skipped_calibration", [])]
    return "\n".join(parts)
