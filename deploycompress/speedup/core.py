"""``speedup``: masks in, a physically smaller model with the masked model's outputs out."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from ..graph import trace_channels
from ..graph.trace import as_input_tuple, check_norm_spans
from .masks import Masks, apply_param_masks, masked_out_channels, validate_masks
from .replace import shrink_model
from .report import LayerReport, SpeedupReport
from .resolve import Removal, decide_removals

log = logging.getLogger(__name__)


class SpeedupError(RuntimeError):
    """The shrunk model does not run or does not reproduce the masked model."""


def _bake_parametrizations(model: nn.Module) -> None:
    """A pruner's mask wrappers (torch parametrizations) become plain tensors holding their current value.

    Done by hand: ``remove_parametrizations`` edits the generated class, which a deep copy shares with
    the caller's model.
    """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            values = {name: getattr(module, name).detach().clone() for name in module.parametrizations.keys()}
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            for name, value in values.items():
                module._parameters[name] = nn.Parameter(value)


def _masked_copy(model: nn.Module, masks: Masks, example_inputs: Any, inplace: bool, norm_spans: str):  # noqa: ANN202
    check_norm_spans(norm_spans)
    checked = validate_masks(model, masks)
    inputs = as_input_tuple(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    _bake_parametrizations(work)
    apply_param_masks(work, checked)
    trace = trace_channels(work, inputs, zero_dead_norms=True, norm_spans=norm_spans)
    return work, checked, inputs, trace


def masked_model(
    model: nn.Module, masks: Masks, example_inputs: Any, *, inplace: bool = False, norm_spans: str = "keep"
) -> nn.Module:
    """The masked model speedup reproduces: masked tensors zeroed, and BatchNorm affine entries behind
    channels that are exactly zero zeroed too (so a removed Conv channel stays zero after its norm).
    ``norm_spans`` as in :func:`speedup`: with "prune", channels zeroed before a LayerNorm count as zero after it.
    """
    return _masked_copy(model, masks, example_inputs, inplace, norm_spans)[0]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _max_abs(out: Any) -> float:
    return max((float(t.detach().abs().max()) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.numel()), default=0.0)


def _compare(reference: Any, actual: Any) -> float:
    ref, act = tree_flatten(reference)[0], tree_flatten(actual)[0]
    if len(ref) != len(act):
        raise SpeedupError(f"the shrunk model returns {len(act)} outputs, the masked model {len(ref)}")
    err = 0.0
    for i, (r, a) in enumerate(zip(ref, act)):
        if isinstance(r, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != r.shape:
                raise SpeedupError(f"output {i}: shape {getattr(a, 'shape', type(a))} after speedup, {tuple(r.shape)} before")
            if r.numel():
                err = max(err, float((r.double() - a.double()).abs().max()))
    return err


def _norms_note(names: list[str], rel_err: float | None) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    by = f"by {rel_err:.3g} (relative)" if rel_err is not None else "(not measured: verify=False)"
    return f"{len(names)} norms now normalise over fewer channels ({shown}): outputs differ from the masked model {by}; fine-tune to recover"


def _runs(model: nn.Module, inputs: tuple, reference: Any) -> bool:
    with torch.no_grad():
        try:
            _compare(reference, model(*inputs))
        except Exception:  # noqa: BLE001 - any failure means the narrowed width was read by code
            return False
    return True


def _shrink_or_keep_read_widths(work: nn.Module, trace: Any, removal: Removal, inputs: tuple, round_to: int):  # noqa: ANN202
    """Shrink ``work``; where Python code read a normalised width that is being removed (Swin's
    ``C // num_heads``, an assertion message, a batch size), try the narrowed model first and, only if
    it fails, keep those widths and shrink again. Most reads are harmless, so pinning all of them up
    front would keep ViT's whole residual stream."""
    read = [ids for ids in trace.width_reads if not bool(removal.keep(ids).all())]
    if not read:
        return shrink_model(work, trace, removal), removal
    backup = copy.deepcopy(work)
    kept = shrink_model(work, trace, removal)
    if _runs(work, inputs, trace.output):
        return kept, removal
    log.info("the model's code reads %d normalised widths that would shrink and fails without them; keeping them", len(read))
    work.__dict__.clear()
    work.__dict__.update(backup.__dict__)  # the caller's object (inplace=True) stays the one returned
    for ids in read:
        trace.pin(ids, "the model's Python code reads their width and fails without it")
    removal = decide_removals(trace, round_to)
    removal.notes.append(f"{len(read)} normalised widths are read by the model's Python code and kept: removing them broke the forward pass")
    return shrink_model(work, trace, removal), removal


def speedup_with_report(
    model: nn.Module,
    masks: Masks,
    example_inputs: Any,
    *,
    round_to: int = 1,
    norm_spans: str = "keep",
    inplace: bool = False,
    verify: bool = True,
) -> tuple[nn.Module, SpeedupReport]:
    """Like :func:`speedup`, and also return the per-layer :class:`SpeedupReport`.

    Where ``norm_spans="prune"`` narrowed a norm (``report.norms_changed``), the shrunk model is not
    the masked model: the error is measured and noted, not warned about.
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    check_norm_spans(norm_spans)
    start = time.perf_counter()
    params_before = {n: _numel(m) for n, m in model.named_modules()}
    total_before = sum(p.numel() for p in model.parameters())
    work, checked, inputs, trace = _masked_copy(model, masks, example_inputs, inplace, norm_spans)
    reference = trace.output
    removal = decide_removals(trace, round_to)
    kept, removal = _shrink_or_keep_read_widths(work, trace, removal, inputs, round_to)
    norms_changed = [name for name, ids in trace.norms.items() if not bool(removal.keep(ids).all())]
    modules = dict(work.named_modules())
    layers = []
    for name, rec in sorted(trace.producers.items(), key=lambda kv: kv[1].order):
        in_keep, out_keep = kept[name]
        masked = masked_out_channels(checked, name, rec.kind, rec.weight_attr, rec.bias_attr)
        layers.append(
            LayerReport(
                name, rec.kind, in_keep.numel(), int(in_keep.sum()), out_keep.numel(), int(out_keep.sum()),
                int(masked.sum()) if masked is not None else 0,
                int((masked & out_keep).sum()) if masked is not None else 0,
                params_before.get(name, 0), _numel(modules[name]),
            )
        )  # fmt: skip
    notes = list(removal.notes)
    held = [r for r in layers if r.kept_masked]
    if held:
        notes.append(
            f"{len(held)} layers keep {sum(r.kept_masked for r in held)} masked output channels (zeroed): removing them "
            "would change the outputs (a residual partner, a constant, or an op that spans them) or the shapes"
        )
        warnings.warn(notes[-1], stacklevel=2)
    err = ref_max = None
    if verify:
        with torch.no_grad():
            try:
                actual = work(*inputs)
            except Exception as exc:
                hint = f" (it narrows norms {norms_changed[:3]}; norm_spans='keep' does not)" if norms_changed else ""
                raise SpeedupError(f"the shrunk model fails on the example inputs{hint}: {exc}") from exc
        err, ref_max = _compare(reference, actual), _max_abs(reference)
        if not norms_changed and err > 1e-4 * max(ref_max, 1.0):
            notes.append(f"outputs differ from the masked model by {err:.3g} (max |output| {ref_max:.3g})")
            warnings.warn(notes[-1], stacklevel=2)
    if norms_changed:
        notes.append(_norms_note(norms_changed, None if err is None else err / max(ref_max, 1e-12)))
    report = SpeedupReport(
        layers, total_before, sum(p.numel() for p in work.parameters()), err, ref_max,
        time.perf_counter() - start, round_to, notes, norms_changed,
    )  # fmt: skip
    log.info("speedup: params %d -> %d in %.2f s", report.params_before, report.params_after, report.seconds)
    return work, report


def speedup(
    model: nn.Module, masks: Masks, example_inputs: Any, *, round_to: int = 1, norm_spans: str = "keep", inplace: bool = False, verify: bool = True
) -> nn.Module:
    """Return a physically smaller copy of ``model`` whose eval-mode outputs equal the masked model's.

    ``masks`` is ``{module_name: {param_name: mask}}`` (True/1 = keep; NNI's files load as-is).
    Channels that cannot be removed without changing outputs or shapes stay, zeroed, and are listed
    in the report (see :func:`speedup_with_report`). ``round_to=N`` keeps every pruned width a
    multiple of N. The caller's model is deep-copied unless ``inplace=True``.

    ``norm_spans="keep"`` keeps every channel a LayerNorm/RMSNorm/GroupNorm normalises over, so outputs
    equal the masked model's. ``"prune"`` removes them like other channels (GroupNorm: equal counts per
    group) and narrows the norm; its statistics then change, so outputs differ until fine-tuned.
    """
    return speedup_with_report(
        model, masks, example_inputs, round_to=round_to, norm_spans=norm_spans, inplace=inplace, verify=verify
    )[0]
