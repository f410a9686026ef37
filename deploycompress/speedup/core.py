"""``speedup``: masks in, a physically smaller model with the masked model's outputs out."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..checks import check_example_inputs
from ..errors import StepError
from ..graph import trace_channels
from ..graph.rules.dead import restore_kept
from ..graph.trace import as_input_tuple, check_norm_spans
from ..model_copy import strip_parametrizations
from ..subclasses import follow_subclasses
from .masks import Masks, apply_param_masks, masked_out_channels, validate_masks
from .replace import shrink_model
from .reasons import constant_sources, kept_reasons, kept_tensor_masks
from .report import LayerReport, NormsChangedWarning, SpeedupReport, SpeedupWarning
from .resolve import Removal, decide_removals

log = logging.getLogger(__name__)

EXACT_TOLERANCE = 1e-4  # the default promise: max |shrunk - masked| <= 1e-4 x max |masked output|


class SpeedupError(StepError, RuntimeError):
    """The shrunk model does not run or does not reproduce the masked model."""


MASKED_CONSTANTS = ("keep", "prune")  # what speedup does with masked channels whose value is a non-zero constant


def check_masked_constants(masked_constants: Any) -> str:
    if masked_constants not in MASKED_CONSTANTS:
        raise ValueError(f"masked_constants must be one of {', '.join(map(repr, MASKED_CONSTANTS))}, got {masked_constants!r}")
    return masked_constants


def _user_masked(model: nn.Module, masks: Masks, inplace: bool) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """The user's masked model: each mask multiplied into exactly the tensor it names, nothing else."""
    checked = validate_masks(model, masks)
    work = strip_parametrizations(model if inplace else copy.deepcopy(model)).eval()
    apply_param_masks(work, checked)
    return work, checked


def masked_model(
    model: nn.Module, masks: Masks, example_inputs: Any = None, *, inplace: bool = False, norm_spans: str = "keep"
) -> nn.Module:
    """The reference speedup reproduces: ``model`` in eval mode with each mask multiplied into exactly
    the tensor it names (pruner parametrizations baked in), nothing else changed. ``example_inputs``
    and ``norm_spans`` are accepted for compatibility and checked; they do not change the reference.
    """
    check_norm_spans(norm_spans)
    if example_inputs is not None:
        as_input_tuple(example_inputs, model)
    return _user_masked(model, masks, inplace)[0]


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
    masked_constants: str = "keep",
    inplace: bool = False,
    verify: bool = True,
) -> tuple[nn.Module, SpeedupReport]:
    """Like :func:`speedup`, and also return the per-layer :class:`SpeedupReport`.

    ``report.max_abs_error``/``relative_error`` compare the shrunk model with the user's masked model
    (:func:`masked_model`). Where ``norm_spans="prune"`` narrowed a norm (``report.norms_changed``) or
    ``masked_constants="prune"`` dropped non-zero constants (``report.constants_dropped``), the shrunk
    model is not the masked model: the error is measured and noted, not warned about.
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    check_norm_spans(norm_spans)
    check_masked_constants(masked_constants)
    validate_masks(model, masks)  # the cheap checks first, then one forward run:
    check_example_inputs(model, example_inputs)  # a wrong shape is named as the argument, before tracing
    inputs = as_input_tuple(example_inputs, model)
    start = time.perf_counter()
    total_before = sum(p.numel() for p in model.parameters())
    work, checked = _user_masked(model, masks, inplace)
    params_before = {n: _numel(m) for n, m in work.named_modules()}  # pruner parametrizations stripped: counted as plain weights
    follow_subclasses(work, inputs, warn=True)  # layer subclasses: followed, weights computed in forward baked, or refused
    drop = masked_constants == "prune"
    reference = None
    if drop and verify:  # the trace below edits the copy: take the user's reference first
        with torch.no_grad():
            reference = work(*inputs)
    trace = trace_channels(work, inputs, zero_dead_norms=drop, norm_spans=norm_spans)
    if not drop:
        reference = trace.output  # the trace changed nothing: its forward pass is the user's masked model
    constants = constant_sources(trace, work)
    removal = decide_removals(trace, round_to)
    constants_dropped = restore_kept(trace.dropped, removal.keep)  # masked_constants="prune" changes removed channels only
    kept, removal = _shrink_or_keep_read_widths(work, trace, removal, inputs, round_to)
    norms_changed = [name for name, ids in trace.norms.items() if not bool(removal.keep(ids).all()) and name not in removal.norms_exact]
    modules = dict(work.named_modules())
    masked_by_layer = {
        name: masked_out_channels(checked, name, rec.kind, rec.weight_attr, rec.bias_attr) for name, rec in trace.producers.items()
    }
    reasons = kept_reasons(trace, removal, masked_by_layer, constants)
    layers = []
    for name, rec in sorted(trace.producers.items(), key=lambda kv: kv[1].order):
        in_keep, out_keep = kept[name]
        masked = masked_by_layer[name]
        layers.append(
            LayerReport(
                name, rec.kind, in_keep.numel(), int(in_keep.sum()), out_keep.numel(), int(out_keep.sum()),
                int(masked.sum()) if masked is not None else 0,
                int((masked & out_keep).sum()) if masked is not None else 0,
                params_before.get(name, 0), _numel(modules[name]) if name in modules else 0, reasons.get(name, {}),
            )
        )  # fmt: skip
    notes = list(removal.notes)
    held = [r for r in layers if r.kept_masked]
    if held:
        shown = "; ".join(f"{r.name} keeps {r.kept_masked} ({', '.join(r.kept_reasons)})" for r in held[:5])
        more = f"; and {len(held) - 5} more layers (see the report)" if len(held) > 5 else ""
        notes.append(f"{len(held)} layers keep {sum(r.kept_masked for r in held)} masked output channels (zeroed): {shown}{more}")
        warnings.warn(notes[-1], SpeedupWarning, stacklevel=2)
    tensors_kept = kept_tensor_masks(trace, removal, checked, masked_by_layer, constants)
    if tensors_kept:  # a norm's or an embedding's masked channels that stay: said like a layer's
        shown = "; ".join(f"{t} keeps {sum(c.values())} ({', '.join(c)})" for t, c in list(tensors_kept.items())[:5])
        more = f"; and {len(tensors_kept) - 5} more tensors" if len(tensors_kept) > 5 else ""
        notes.append(f"{len(tensors_kept)} masked tensors keep {sum(sum(c.values()) for c in tensors_kept.values())} "
                     f"masked channels (zeroed, not removed): {shown}{more}")
        warnings.warn(notes[-1], SpeedupWarning, stacklevel=2)
    unknown = sorted(trace.unknown_ops)
    if unknown:
        notes.append(f"ops without a channel rule kept the channels they read whole: {', '.join(unknown)}")
        warnings.warn(notes[-1], SpeedupWarning, stacklevel=2)
    err = ref_max = None
    if verify:
        with torch.no_grad():
            try:
                actual = work(*inputs)
            except Exception as exc:
                hint = f" (it narrows norms {norms_changed[:3]}; norm_spans='keep' does not)" if norms_changed else ""
                raise SpeedupError(f"the shrunk model fails on the example inputs{hint}: {exc}") from exc
        err, ref_max = _compare(reference, actual), _max_abs(reference)
        if not norms_changed and not constants_dropped and err > EXACT_TOLERANCE * ref_max:
            notes.append(f"outputs differ from the masked model by {err:.3g} (max |output| {ref_max:.3g})")
            warnings.warn(notes[-1], SpeedupWarning, stacklevel=2)
    rel_err = None if err is None or ref_max is None else err / max(ref_max, 1e-12)
    if norms_changed:
        notes.append(_norms_note(norms_changed, rel_err))
        warnings.warn(notes[-1], NormsChangedWarning, stacklevel=2)  # asked for, but not what the user validated
    if removal.norms_exact:
        shown = ", ".join(removal.norms_exact[:3]) + (", ..." if len(removal.norms_exact) > 3 else "")
        notes.append(f"{len(removal.norms_exact)} norms narrowed exactly ({shown}): their statistics still count the "
                     "removed channels, which are zero in the masked model (speedup.norms.ZeroPaddedNorm)")
    if constants_dropped:
        shown = ", ".join(constants_dropped[:3]) + (", ..." if len(constants_dropped) > 3 else "")
        by = f"by {rel_err:.3g} (relative)" if rel_err is not None else "(not measured: verify=False)"
        notes.append(
            f"masked_constants='prune' removed channels whose masked value was a non-zero constant ({shown}): "
            f"outputs differ from the masked model {by}"
        )
    report = SpeedupReport(
        layers, total_before, sum(p.numel() for p in work.parameters()), err, ref_max,
        time.perf_counter() - start, round_to, notes, norms_changed, constants_dropped, unknown, tensors_kept,
    )  # fmt: skip
    log.info("speedup: params %d -> %d in %.2f s", report.params_before, report.params_after, report.seconds)
    return work, report


def speedup(
    model: nn.Module, masks: Masks, example_inputs: Any, *, round_to: int = 1, norm_spans: str = "keep",
    masked_constants: str = "keep", inplace: bool = False, verify: bool = True,
) -> nn.Module:  # fmt: skip
    """Return a physically smaller copy of ``model`` whose eval-mode outputs equal the masked model's.

    ``masks`` is ``{module_name: {param_name: mask}}`` (True/1 = keep; NNI's files load as-is). The
    reference is the user's masked model: each mask multiplied into exactly the tensor it names,
    nothing else (:func:`masked_model`). By default the result reproduces it within
    max |diff| <= 1e-4 x max |output| (eval mode); the report measures by how much.

    A channel is removed only where its value in that reference is provably zero for every input
    or no remaining layer reads it. Masked channels that stay non-zero -- a BatchNorm bias or the
    running mean of an affine-free norm behind a masked conv, a conv bias, ViT's class token or
    position embedding, ``sigmoid(0) = 0.5`` -- are kept, and the report names each layer's kept
    channels with the reason. ``masked_constants="prune"`` removes them anyway (the constants are
    zeroed first, as NNI's speedup does): smaller, but outputs change; the report measures and notes it.
    Pruners that mask joined parameters (``Pruner(..., dummy_input=x)``) make this unnecessary.

    Channels that cannot be removed without changing outputs or shapes stay, zeroed. ``round_to=N``
    keeps every pruned width a multiple of N. The caller's model is deep-copied unless ``inplace=True``.

    ``norm_spans="keep"`` keeps every channel a LayerNorm/RMSNorm/GroupNorm normalises over, so outputs
    equal the masked model's. ``"prune"`` removes them like other channels (GroupNorm: equal counts per
    group) and narrows the norm; its statistics then change, so outputs differ until fine-tuned --
    except where the masks also zero the norm's weight and bias in the removed channels (an
    ``nn.LayerNorm``/``nn.RMSNorm`` then becomes a :class:`~deploycompress.speedup.norms.ZeroPaddedNorm`,
    exact) and for a norm whose output is a model output (it returns the full width, exact); see
    :mod:`deploycompress.speedup.norms` and ``deploycompress.hf.hidden.hidden_masks`` for encoders.
    """
    return speedup_with_report(
        model, masks, example_inputs, round_to=round_to, norm_spans=norm_spans, masked_constants=masked_constants,
        inplace=inplace, verify=verify,
    )[0]
