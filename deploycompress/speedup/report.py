"""The per-layer speedup report: what each layer lost, and what masks asked for but was kept (and why)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """One Conv/Linear/ConvTranspose: channel counts before/after and mask channels kept back."""

    name: str
    kind: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    masked_out: int  # output channels the masks zero whole
    kept_masked: int  # of those, kept (zeroed) because removing them would change outputs or shapes
    params_before: int
    params_after: int
    kept_reasons: dict[str, int] = field(default_factory=dict)  # why kept_masked channels stay: reason -> count


@dataclass
class SpeedupReport:
    """Result of :func:`deploycompress.speedup.speedup_with_report`."""

    layers: list[LayerReport]
    params_before: int
    params_after: int
    max_abs_error: float | None  # shrunk model vs the user's masked model (masks x tensors only), example inputs
    max_abs_output: float | None
    seconds: float
    round_to: int = 1
    notes: list[str] = field(default_factory=list)
    norms_changed: list[str] = field(default_factory=list)  # norm modules narrowed by norm_spans="prune"
    constants_dropped: list[str] = field(default_factory=list)  # tensors masked_constants="prune" changed
    unknown_ops: list[str] = field(default_factory=list)  # ops without a channel rule that pinned channels
    kept_tensor_masks: dict[str, dict[str, int]] = field(default_factory=dict)  # "module.attr" of a norm/embedding -> why -> masked channels kept

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def relative_error(self) -> float | None:
        if self.max_abs_error is None or self.max_abs_output is None:
            return None
        return self.max_abs_error / max(self.max_abs_output, 1e-12)

    def to_dict(self) -> dict:
        return asdict(self) | {"params_ratio": self.params_ratio, "relative_error": self.relative_error}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        rows = [
            "| layer | kind | in | out | masked out | kept masked | params | why kept |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.layers:
            why = "; ".join(f"{n}: {reason}" for reason, n in r.kept_reasons.items())
            rows.append(
                f"| {r.name} | {r.kind} | {r.in_before} -> {r.in_after} | {r.out_before} -> {r.out_after} "
                f"| {r.masked_out} | {r.kept_masked} | {r.params_before} -> {r.params_after} | {why} |"
            )
        head = (
            f"params {self.params_before} -> {self.params_after} ({self.params_ratio:.3f}), "
            f"max |error| vs the masked model {self.max_abs_error} (relative {self.relative_error}), {self.seconds:.2f} s\n\n"
        )
        return head + "\n".join(rows) + "".join(f"\n- {n}" for n in self.notes)


class SpeedupWarning(UserWarning):
    """Speedup kept masked channels, met ops without a channel rule, or does not reproduce the masked model."""


class NormsChangedWarning(SpeedupWarning):
    """``norm_spans="prune"`` narrowed norms inexactly: they normalise over fewer channels, so the shrunk model is
    not the masked model (the measured relative error is in the message and ``report.relative_error``)."""
