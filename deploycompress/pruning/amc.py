"""AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices", ECCV
2018), as NNI 2.x's ``AMCPruner``: a DDPG agent walks the layers in order and picks each one's
pruning ratio; the episode's reward is the pruned model's score; the resource budget is enforced by
bounding each action so the remaining layers can still meet it (AMC's resource-constrained mode).

Small on purpose (two-layer actor and critic, a few hundred transitions): it runs on a CPU for the
layer counts of small models. Resources come from the per-layer lookup table (FLOPs, params or
latency measured after speedup, see :mod:`.resources`); the final choice is measured for real.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .executor import Executor, get_executor
from .io import Masks, _weight
from .netadapt import make_meter
from .resources import LookupTable, ResourceMeter, build_lookup_table
from .scheduler import CompressResult, PrunerSpec, _as_evaluate, _as_finetune, plain_copy, wrap_masks
from .search import Trajectory, fit_measured, layer_masks, selected_layers

__all__ = ["AMCPruner", "DDPG"]

log = logging.getLogger(__name__)


@dataclass
class DDPGParams:
    """NNI's ``ddpg_params`` keys (AMC's defaults, scaled down for small models)."""

    hidden1: int = 64
    hidden2: int = 64
    lr_c: float = 1e-3
    lr_a: float = 1e-4
    warmup: int = 10  # episodes of random actions before the actor acts
    discount: float = 1.0
    bsize: int = 32
    rmsize: int = 2000
    window_length: int = 1
    tau: float = 0.01
    init_delta: float = 0.5  # exploration noise (std of a truncated normal) at the start
    delta_decay: float = 0.95
    updates_per_episode: int = 20


class DDPG:
    """Actor ``state -> action in [0, 1]`` and critic ``(state, action) -> reward``, with target
    networks and a replay buffer (Lillicrap et al., "Continuous control with deep RL")."""

    def __init__(self, n_states: int, p: DDPGParams, seed: int) -> None:
        torch.manual_seed(seed)
        self.p = p
        self.actor = nn.Sequential(nn.Linear(n_states, p.hidden1), nn.ReLU(), nn.Linear(p.hidden1, p.hidden2), nn.ReLU(), nn.Linear(p.hidden2, 1), nn.Sigmoid())
        self.critic = _Critic(n_states, p.hidden1, p.hidden2)
        self.actor_t, self.critic_t = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=p.lr_a)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=p.lr_c)
        self.buffer: list[tuple[np.ndarray, float, float, np.ndarray, bool]] = []
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def act(self, state: np.ndarray, delta: float) -> float:
        with torch.no_grad():
            a = float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])
        # AMC's exploration: truncated normal around the actor's action
        for _ in range(100):
            x = self.rng.normal(a, delta)
            if 0.0 <= x <= 1.0:
                return float(x)
        return float(min(max(a, 0.0), 1.0))

    def remember(self, s: np.ndarray, a: float, r: float, s2: np.ndarray, done: bool) -> None:
        self.buffer.append((s, a, r, s2, done))
        if len(self.buffer) > self.p.rmsize:
            self.buffer.pop(0)

    def update(self) -> None:
        if len(self.buffer) < self.p.bsize:
            return
        idx = torch.randint(len(self.buffer), (self.p.bsize,), generator=self.gen).tolist()
        s, a, r, s2, d = (torch.as_tensor(np.array(x), dtype=torch.float32) for x in zip(*(self.buffer[i] for i in idx)))
        a, r, d = a[:, None], r[:, None], d[:, None]
        with torch.no_grad():
            target = r + self.p.discount * (1 - d) * self.critic_t(s2, self.actor_t(s2))
        loss_c = nn.functional.mse_loss(self.critic(s, a), target)
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(s, self.actor(s)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
            for p, pt in zip(net.parameters(), tgt.parameters()):
                pt.data.mul_(1 - self.p.tau).add_(self.p.tau * p.data)


class _Critic(nn.Module):
    def __init__(self, n_states: int, h1: int, h2: int) -> None:
        super().__init__()
        self.s = nn.Linear(n_states, h1)
        self.a = nn.Linear(1, h1)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.out(self.s(s) + self.a(a))


class AMCPruner(CompressResult):
    """``AMCPruner(total_episode, model, config_list, dummy_input, evaluator, pruning_algorithm='l1',
    log_dir='.', keep_intermediate_result=False, finetuner=None, speedup=False, ddpg_params={},
    pruning_params={}, target='flops')`` as in NNI 2.x.

    ``config_list`` selects the layers and gives ``total_sparsity`` (the budget: the resource may be
    at most ``1 - total_sparsity`` of the dense model's) and ``max_sparsity_per_layer``.
    ``target`` is ``'flops'``, ``'params'`` or ``'latency'`` (or a :class:`ResourceMeter`); ``budget``
    overrides the fraction. The best episode's ratios are returned, fine-tuned by ``finetuner`` if given.
    """

    def __init__(
        self, total_episode: int, model: nn.Module, config_list: list[dict[str, Any]], dummy_input: Any, evaluator: Any,
        pruning_algorithm: PrunerSpec = "l1", log_dir: str = ".", keep_intermediate_result: bool = False, finetuner: Any = None,
        speedup: bool = False, ddpg_params: Mapping[str, Any] | None = None, pruning_params: Mapping[str, Any] | None = None,
        target: str | ResourceMeter = "flops", *, budget: float | None = None, grid: Sequence[float] = (0.25, 0.5, 0.75),
        executor: Executor | str | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        if evaluator is None:
            raise ValueError("AMCPruner needs an evaluator (model -> score): it is the agent's reward")
        if speedup and dummy_input is None:
            raise ValueError("AMCPruner: speedup=True needs dummy_input")
        unknown = set(ddpg_params or {}) - set(DDPGParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"AMCPruner: unknown ddpg_params {sorted(unknown)}; known: {sorted(DDPGParams.__dataclass_fields__)}")
        self.p = DDPGParams(**(ddpg_params or {}))
        if total_episode <= self.p.warmup:
            raise ValueError(f"AMCPruner: total_episode ({total_episode}) must exceed ddpg_params warmup ({self.p.warmup})")
        totals = [c for c in config_list if "total_sparsity" in c]
        if budget is None:
            if not totals:
                raise ValueError("AMCPruner: the config_list needs total_sparsity (or pass budget=)")
            budget = 1.0 - float(totals[0]["total_sparsity"])
        self.budget = float(budget)
        self.max_ratio = float(totals[0].get("max_sparsity_per_layer", 0.8)) if totals else 0.8
        self.total_episode, self.model, self.seed = total_episode, model, seed
        self.meter = make_meter(target, dummy_input)
        self.evaluate = _as_evaluate(evaluator)
        self.finetune = _as_finetune(finetuner, None, None)
        self.algo, self.params = pruning_algorithm, dict(pruning_params or {})
        self.speedup, self.dummy_input = speedup, dummy_input
        self.layers = list(selected_layers(model, config_list, pruning_algorithm))
        self.grid = tuple(grid)
        self.executor = get_executor(executor, seed)
        self.lookup_table: LookupTable | None = None
        self.trajectory: Trajectory | None = None
        self.best_sparsities: dict[str, float] = {}
        self._result: tuple[nn.Module, Masks] | None = None

    def _states(self, model: nn.Module) -> np.ndarray:
        """AMC's layer embedding: index, in/out channels, kernel, stride, weight count, normalised."""
        modules = dict(model.named_modules())
        rows = []
        for i, name in enumerate(self.layers):
            m = modules[name]
            w = _weight(m)
            assert w is not None
            k = getattr(m, "kernel_size", (1,))[0]
            stride = getattr(m, "stride", (1,))[0]
            rows.append([i, w.shape[1] if w.dim() > 1 else 1, w.shape[0], k, stride, w.numel()])
        s = np.array(rows, dtype=np.float64)
        return s / np.maximum(s.max(0), 1e-12)

    def _bounded(self, i: int, action: float, chosen: dict[str, float]) -> float:
        """Clip ``action`` so the remaining layers at ``max_ratio`` can still meet the budget."""
        table = self.lookup_table
        assert table is not None
        name, rest = self.layers[i], self.layers[i + 1 :]
        goal = self.budget * table.dense
        a = min(max(action, 0.0), self.max_ratio)
        for lo in np.linspace(0.0, self.max_ratio, 81):
            if lo < a:
                continue
            trial = {**chosen, name: float(lo), **{r: self.max_ratio for r in rest}}
            if table.estimate(trial) <= goal:
                return float(lo)
        return float(self.max_ratio)

    def compress(self) -> tuple[nn.Module, Masks]:
        origin = plain_copy(self.model)
        make = lambda m, sp: layer_masks(self.algo, self.params, m, sp, None, self.dummy_input)  # noqa: E731
        self.lookup_table = table = build_lookup_table(origin, list(self.layers), make, self.meter, self.grid, self.executor)
        emb = self._states(origin)
        n = len(self.layers)
        agent = DDPG(emb.shape[1] + 2, self.p, self.seed)
        rng = np.random.default_rng(self.seed)
        traj = self.trajectory = Trajectory(self.meter.metric, table.dense, self.evaluate(origin) if self.evaluate else None, self.budget * table.dense)
        best: tuple[float, dict[str, float]] | None = None
        baseline: float | None = None
        delta = self.p.init_delta
        for ep in tqdm(range(self.total_episode), desc="AMC episodes", unit="episode", leave=False, disable=None):
            chosen: dict[str, float] = {}
            steps = []
            prev = 0.0
            for i, name in enumerate(self.layers):
                state = np.concatenate([emb[i], [prev, table.estimate(chosen) / table.dense]])
                raw = float(rng.uniform(0, 1)) if ep < self.p.warmup else agent.act(state, delta)
                action = self._bounded(i, raw * self.max_ratio, chosen)
                chosen[name] = action
                steps.append((state, action / self.max_ratio))
                prev = action
            masks = make(origin, chosen)
            score = self.evaluate(wrap_masks(plain_copy(origin), masks))  # type: ignore[misc]
            resource = table.estimate(chosen)
            traj.add(origin, masks, sparsities=dict(chosen), score=score, resource=resource, measured=False)
            baseline = score if baseline is None else 0.95 * baseline + 0.05 * score
            reward = score - baseline  # AMC: reward minus a moving average
            for j, (s, a) in enumerate(steps):
                s2 = steps[j + 1][0] if j + 1 < n else s
                agent.remember(s, a, reward, s2, j + 1 == n)
            if ep >= self.p.warmup:
                for _ in range(self.p.updates_per_episode):
                    agent.update()
                delta *= self.p.delta_decay
            if best is None or score > best[0]:
                best = (score, dict(chosen))
            log.info("AMC episode %d: score %.4f, %s %.4g, ratios %s", ep, score, self.meter.metric, resource,
                     {k: round(v, 3) for k, v in chosen.items()})  # fmt: skip
        assert best is not None
        score, sparsities = best
        self.best_sparsities, masks, measured = fit_measured(origin, sparsities, make, self.meter, self.budget * table.dense, self.max_ratio, dense_value=table.dense)
        if self.best_sparsities != sparsities:
            score = self.evaluate(wrap_masks(plain_copy(origin), masks))  # type: ignore[misc]
        traj.add(origin, masks, sparsities=self.best_sparsities, score=score, resource=measured, measured=True, accepted=True)
        log.info("AMC best: score %.4f, %s measured %.4g (budget %.4g)", score, self.meter.metric, measured, self.budget * table.dense)
        model = wrap_masks(plain_copy(origin), masks)
        if self.finetune is not None:
            self.finetune(model)
        if self.speedup:
            from ..speedup import speedup as _speedup

            self._result = (_speedup(plain_copy(model), masks, self.dummy_input), {})
        else:
            self._result = (model, masks)
        return self._result
