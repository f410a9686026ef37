"""Block-wise reconstruction of a pruned BERT-family encoder by gradient descent, one layer at a time.

After head/FFN pruning (and the closed-form refit of :mod:`deploycompress.hf.refit`), every parameter of each
pruned layer -- query/key/value, the attention output projection, both FFN Linears and the two LayerNorms -- is
trained so that the layer, fed the STUDENT's own input hidden states, reproduces the DENSE layer's output
hidden states on calibration text:

    min_theta  sum_tokens || layer_i(h_student_i; theta) - h_dense_(i+1) ||^2 / (tokens * hidden)

layer after layer in network order: ``h_student_i`` comes from the student's embeddings and layers ``0..i-1``
as already reconstructed, so each layer also absorbs the drift of those before it (as the least-squares refit
with ``absorb_residual`` does for one Linear). This is the block reconstruction of post-training compression
(Li et al., 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", one
transformer layer being the block; Kwon et al., 2022, "A Fast Post-Training Pruning Framework for
Transformers", whose layer-wise reconstruction after head/FFN pruning tunes one scale per unit in closed form,
here every weight by Adam). One step is one layer's forward and backward on one cached batch: about a sixth of
a distillation step of a 6-layer model, with no teacher forward (the dense targets are computed once).

The student's input to layer 0 and the dense layer outputs are computed once per batch and kept in memory
(``batches x batch x tokens x hidden`` floats, twice per layer for the dense targets); after layer ``i`` is
trained, layer ``i+1``'s inputs are layer ``i``'s outputs on the cached inputs. Padding tokens (where the
batch's ``attention_mask`` is 0) are left out of the loss and of the reported errors.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batch_list, call_with_batch
from ..pruning.distill import eval_mode
from .importance import _layers
from .tokens import attention_mask_of

log = logging.getLogger(__name__)

__all__ = ["BlockFit", "BlockReconstructionResult", "block_reconstruct", "token_mask"]


@dataclass
class BlockFit:
    """One reconstructed layer: the relative error ``||H_student - H_dense|| / ||H_dense||`` of its output hidden
    states over the calibration tokens (padding left out), before and after its training (its inputs already from
    the reconstructed earlier layers), and the mean loss of its first and last tenth of steps."""

    layer: str
    error_before: float
    error_after: float
    loss_first: float
    loss_last: float


@dataclass
class BlockReconstructionResult:
    """The reconstructed copy of the student and one :class:`BlockFit` per layer, in network order."""

    model: nn.Module
    layers: list[BlockFit] = field(default_factory=list)


class _Stop(Exception):
    """Raised by the capture hook: nothing after layer 0's input is needed."""


def token_mask(batch: Any, shape: torch.Size, names: Sequence[str] = ("input_ids", "attention_mask")) -> torch.Tensor:
    """Which tokens count, as a float (batch, tokens) tensor: the batch's ``attention_mask`` -- a dict's
    ``"attention_mask"``, or in a tuple/list the element at the position of ``"attention_mask"`` in ``names`` (the
    model's forward parameters in order) -- when it has the hidden states' leading ``(batch, tokens)`` shape
    ``shape[:2]``; otherwise every token (ones)."""
    m = attention_mask_of(batch, names)  # the one rule for where a batch keeps its mask
    if isinstance(m, torch.Tensor) and tuple(m.shape) == tuple(shape[:2]):
        return m.to(torch.float32)
    return torch.ones(tuple(shape[:2]))


def _hidden(out: Any) -> torch.Tensor:
    """A layer's output hidden states: the tensor itself (transformers >= 5) or the first element of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _masked_sq(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over counted tokens of ||a - b||^2, of ||b||^2)."""
    w = m.unsqueeze(-1)
    return ((a.float() - b) ** 2 * w).sum(), (b**2 * w).sum()


def block_reconstruct(dense: nn.Module, student: nn.Module, batches: Sequence[Any], steps: int = 200, lr: float = 1e-4,
                      weight_decay: float = 0.0, autocast: torch.dtype | None = None, seed: int = 0,
                      progress: bool | None = None) -> BlockReconstructionResult:
    """Train each layer of a copy of ``student`` to map its own inputs to ``dense``'s layer outputs (module docstring).

    ``dense``: the unpruned model; ``student``: the same model after head/FFN pruning and ``speedup`` (and a refit),
    with as many layers (both with a BERT-style ``encoder.layer`` list, e.g. :class:`~deploycompress.hf.Encoder`);
    ``batches``: calibration inputs as the models take them, e.g. ``(input_ids (B, T), attention_mask (B, T))``
    tuples or dicts (:func:`token_mask` says which tokens count, from the student's forward parameter names).
    ``steps``: Adam steps per layer, one cached batch each (cycled in a shuffled order from ``seed``), ``lr`` with
    linear warm-up over 6 % of the steps then linear decay to zero, ``weight_decay`` (AdamW), gradient norm clipped to 1; ``autocast``: ``torch.bfloat16`` runs the
    layer's forward in bfloat16 (the loss in float32). Loss: mean squared error per hidden unit over the counted
    tokens. ``steps=0`` only measures the errors. Dropout is off throughout (eval mode).

    Returns a :class:`BlockReconstructionResult` holding a new model (eval mode); ``dense``, ``student`` and
    ``batches`` are not modified. Memory: the cached hidden states, about ``3 x tokens x hidden`` floats.
    Raises ``ValueError`` (before any training) when a model has no ``encoder.layer`` list, the layer counts differ,
    ``student`` is ``dense``, ``batches`` is empty, ``steps`` is not an int >= 0, ``lr`` <= 0, or ``autocast`` is not
    ``None``/``torch.bfloat16``/``torch.float16``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"block_reconstruct: steps must be an int >= 0 (Adam steps per layer), got {steps!r}")
    if not lr > 0:
        raise ValueError(f"block_reconstruct: lr must be > 0, got {lr}")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"block_reconstruct: autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if student is dense:
        raise ValueError("block_reconstruct: student and dense are the same module; pass the pruned model as the student")
    batches = batch_list(batches, "batches")
    if not batches:
        raise ValueError("block_reconstruct: no batches given; pass a few calibration inputs")
    d_prefix, d_layers = _layers(dense)
    s_prefix, s_layers = _layers(student)
    if len(d_layers) != len(s_layers):
        raise ValueError(f"block_reconstruct: the dense model has {len(d_layers)} layers and the student {len(s_layers)}; "
                         "pass the model speedup returned for the same dense model")
    student = copy.deepcopy(student).eval()
    names = list(inspect.signature(student.forward).parameters)
    s_layers = student.get_submodule(s_prefix)
    n = len(s_layers)

    # cache: the student's input to layer 0 (with the other arguments the encoder passes), the dense layer outputs
    calls: list[tuple[tuple, dict]] = []
    inputs: list[torch.Tensor] = []
    targets: list[list[torch.Tensor]] = [[] for _ in range(n)]
    masks: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))
        raise _Stop

    with torch.no_grad(), eval_mode(dense):
        for j, b in enumerate(batches):
            h = s_layers[0].register_forward_pre_hook(pre, with_kwargs=True)
            try:
                call_with_batch(student, b)
            except _Stop:
                pass
            finally:
                h.remove()
            if len(calls) != len(inputs) + 1:
                raise RuntimeError(f"block_reconstruct: the student's forward never called {s_prefix}.0")
            args, kwargs = calls[-1]
            x = args[0] if args else kwargs.pop("hidden_states")
            calls[-1] = (args[1:], kwargs)
            inputs.append(x.detach())
            got: list[torch.Tensor] = []
            hooks = [layer.register_forward_hook(lambda _m, _i, out: got.append(_hidden(out).detach())) for layer in d_layers]
            try:
                call_with_batch(dense, b)
            finally:
                for hk in hooks:
                    hk.remove()
            if len(got) != n:
                raise RuntimeError(f"block_reconstruct: the dense model's forward called {len(got)} of its {n} layers once each")
            for i, y in enumerate(got):
                targets[i].append(y)
            masks.append(token_mask(b, x.shape, names))
            if not j and masks[0].all() and not (isinstance(b, dict) and "attention_mask" in b):
                log.info("block_reconstruct: no attention_mask found in the batches (forward parameters %s): every token counts", names)

    def run(layer: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = calls[j]
        return _hidden(layer(x, *args, **kwargs))

    def error(layer: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        num = den = 0.0
        outs = []
        with torch.no_grad():
            for j, (x, y) in enumerate(zip(xs, ys)):
                out = run(layer, j, x)
                a, b = _masked_sq(out, y, masks[j])
                num, den = num + float(a), den + float(b)
                outs.append(out.detach())
        return (num / den) ** 0.5 if den > 0 else 0.0, outs

    result = BlockReconstructionResult(student)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=n * steps, desc="block reconstruction", unit="step", leave=False,
               disable=None if progress is None else not progress)  # fmt: skip
    try:
        xs = inputs
        for i, layer in enumerate(s_layers):
            before, _ = error(layer, xs, targets[i])
            losses: list[float] = []
            if steps:
                params = list(layer.parameters())
                flags = [p.requires_grad for p in params]
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
                warm = max(1, round(0.06 * steps))
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
                order = torch.randperm(len(xs), generator=gen).tolist()
                for s in range(steps):
                    j = order[s % len(order)]
                    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                        out = run(layer, j, xs[j])
                    sq, _ = _masked_sq(out, targets[i][j], masks[j])
                    loss = sq / (masks[j].sum().clamp(min=1) * out.shape[-1])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    bar.update()
                for p, f in zip(params, flags):
                    p.requires_grad_(f)
                    p.grad = None
            after, xs = error(layer, xs, targets[i])
            tenth = max(1, len(losses) // 10)
            fit = BlockFit(f"{s_prefix}.{i}", before, after, sum(losses[:tenth]) / tenth if losses else float("nan"),
                           sum(losses[-tenth:]) / tenth if losses else float("nan"))  # fmt: skip
            result.layers.append(fit)
            log.info("block reconstruction %s: relative error %.4f -> %.4f", fit.layer, before, after)
    finally:
        bar.close()
    return result
