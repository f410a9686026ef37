"""AutoCompress (Liu et al., "AutoCompress: An Automatic DNN Structured Pruning Framework for
Ultra-High Compression Rates", AAAI 2020), as NNI 2.x's ``AutoCompressPruner``: each of
``total_iteration`` rounds searches per-layer sparsities with simulated annealing for that round's
share of the budget, then prunes with ADMM at those sparsities, then fine-tunes (optional)."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from torch import nn
from tqdm.auto import tqdm

from .admm import ADMMPruner
from .annealing import SimulatedAnnealingPruner
from .io import Masks
from .scheduler import CompressResult, TaskResult, _as_evaluate, _as_finetune, _pin, masked_fraction, plain_copy, wrap_masks
from .task_generator import scale_config_list

__all__ = ["AutoCompressPruner"]

log = logging.getLogger(__name__)


class AutoCompressPruner(CompressResult):
    """``AutoCompressPruner(model, config_list, total_iteration, admm_params, sa_params, log_dir='.',
    keep_intermediate_result=False, finetuner=None, speedup=False, dummy_input=None, evaluator=None)``.

    Round ``t`` targets ``1 - (1 - s)^(t/n)`` of the ``total_sparsity`` ``s`` (a ``budget`` in
    ``sa_params`` with a ``resource`` becomes ``budget^(t/n)``). ``admm_params`` are
    :class:`ADMMPruner`'s (``evaluator``, ``iterations``, ``training_epochs``, ``granularity``);
    ``sa_params`` are :class:`SimulatedAnnealingPruner`'s (``evaluator`` defaults to this one's).
    ``speedup=True`` is not supported: rounds keep the original shapes.
    """

    def __init__(
        self, model: nn.Module, config_list: list[dict[str, Any]], total_iteration: int, admm_params: Mapping[str, Any],
        sa_params: Mapping[str, Any], log_dir: str | os.PathLike[str] = ".", keep_intermediate_result: bool = False,
        finetuner: Any = None, speedup: bool = False, dummy_input: Any = None, evaluator: Any = None,
    ) -> None:  # fmt: skip
        if speedup:
            raise ValueError("AutoCompressPruner: speedup between rounds is not supported; speed up the result instead")
        if isinstance(total_iteration, bool) or not isinstance(total_iteration, int) or total_iteration < 1:
            raise ValueError(f"total_iteration must be a positive integer, got {total_iteration!r}")
        if "evaluator" not in admm_params:
            raise ValueError("AutoCompressPruner: admm_params needs an 'evaluator' (a TorchEvaluator for the ADMM training)")
        self.model, self.config_list, self.total_iteration = model, config_list, total_iteration
        self.admm_params, self.sa_params = dict(admm_params), dict(sa_params)
        self.sa_params.setdefault("evaluator", evaluator)
        if self.sa_params["evaluator"] is None:
            raise ValueError("AutoCompressPruner: give evaluator (or sa_params['evaluator']) to score the annealing candidates")
        self.sa_params.setdefault("dummy_input", dummy_input)
        self.finetune = _as_finetune(finetuner, None, None)
        self.evaluate = _as_evaluate(evaluator)
        self.history: list[TaskResult] = []
        self._result: tuple[nn.Module, Masks] | None = None

    def compress(self) -> tuple[nn.Module, Masks]:
        current = plain_copy(self.model)
        masks: Masks = {}
        n = self.total_iteration
        budget = self.sa_params.get("budget")
        for t in tqdm(range(1, n + 1), desc="AutoCompress rounds", unit="round", leave=False, disable=None):
            config_t = scale_config_list(self.config_list, lambda s: 1 - (1 - s) ** (t / n))
            sa_params = dict(self.sa_params)
            if budget is not None:
                sa_params["budget"] = budget ** (t / n)
            sa = SimulatedAnnealingPruner(current, config_t, origin_masks=masks, **sa_params)
            sa.compress()
            per_layer = [{"op_names": [name], "sparsity": s} for name, s in sa.best_sparsities.items()]
            admm = ADMMPruner(current, per_layer, **self.admm_params)
            if masks:
                _pin(admm, masks)
            wrapped, masks = admm.compress()
            masks = {k: {p: m.clone() for p, m in e.items()} for k, e in masks.items()}
            example = sa.dummy_input  # the annealing's example batch (its meter's by default)
            if example is not None and self.admm_params.get("granularity") == "coarse-grained":
                from ..speedup.joined import joined_masks  # what speedup removes with the pruned channels (BatchNorm
                # affine, downstream biases) is masked too, so the sped-up result meets the searched resource

                masks = joined_masks(plain_copy(wrapped), masks, example)
                wrapped = wrap_masks(plain_copy(wrapped), masks)
            if self.finetune is not None:
                self.finetune(wrapped)
            score = self.evaluate(wrapped) if self.evaluate is not None else None
            current = plain_copy(wrapped)
            result = TaskResult(t, per_layer, masks, score, masked_fraction(current, masks))
            self.history.append(result)
            log.info("AutoCompress round %d/%d: sparsity %.4f, score %s", t, n, result.sparsity, score)
        self._result = (wrap_masks(plain_copy(current), masks), masks)
        return self._result
