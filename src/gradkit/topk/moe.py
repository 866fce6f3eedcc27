"""A toy mixture-of-experts: the same layer routed by softmax, hard top-k, soft_topk, sparse_topk.

Task: inputs from ``experts`` Gaussian clusters in ``R^dim``; cluster ``j`` maps ``x`` to
``tanh(A_j x) B_j``.  A router that sends each input to its cluster's expert solves it.

Layer: ``experts`` MLPs (``dim → hidden → out``) and a linear router giving logits ``r(x)``;
the output is ``Σ_e g_e(x) · expert_e(x)`` with gates

* ``softmax``: ``softmax(r)``, dense: every expert runs on every input;
* ``hard``: ``softmax`` over the ``k`` largest logits, zero elsewhere (the usual top-k
  router); only the chosen experts run;
* ``soft_topk``: ``soft_topk(r, k, τ)/k``, dense (every gate is positive), so every expert runs;
* ``sparse_topk``: ``sparse_topk(r, k, τ)/k``: exact zeros, so an expert runs only on the
  inputs whose gate is non-zero (the dispatch skips the rest), and the gradient is the
  operator's own, through every non-zero gate.

Dispatch is the same code for all four (per expert: gather the inputs with a non-zero gate,
run the expert, scatter-add); a dense gate just selects every input.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .soft_topk import soft_topk
from .sparse_topk import sparse_topk

__all__ = ["GATINGS", "MoE", "MoEConfig", "compare", "make_task", "train_moe"]

GATINGS = ("softmax", "hard", "soft_topk", "sparse_topk")


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and training settings of the toy task (plain data)."""

    dim: int = 32
    hidden: int = 512
    out: int = 4
    experts: int = 8
    k: int = 2
    temperature: float = 1.0
    batch: int = 256
    steps: int = 300
    lr: float = 3e-3
    test_size: int = 4096


def make_task(config: MoEConfig, seed: int):
    """``sample(n, generator) -> (x, y)`` for the clustered task fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(config.experts, config.dim, generator=generator)
    maps_a = torch.randn(config.experts, config.dim, config.dim, generator=generator) / 2
    maps_b = torch.randn(config.experts, config.dim, config.out, generator=generator)

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        cluster = torch.randint(config.experts, (n,), generator=gen)
        x = centers[cluster] + torch.randn(n, config.dim, generator=gen)
        hidden = torch.tanh(torch.einsum("nd,nde->ne", x, maps_a[cluster]))
        return x, torch.einsum("ne,neo->no", hidden, maps_b[cluster])

    return sample


class MoE(nn.Module):
    """``experts`` MLPs and a linear router; ``gating`` one of :data:`GATINGS`."""

    def __init__(self, config: MoEConfig, gating: str):
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        self.config, self.gating = config, gating
        self.router = nn.Linear(config.dim, config.experts)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(config.dim, config.hidden),
                nn.GELU(),
                nn.Linear(config.hidden, config.out),
            )
            for _ in range(config.experts)
        )

    def gates(self, x: Tensor) -> Tensor:
        """``(batch, experts)`` gate weights."""
        logits = self.router(x)
        k, tau = self.config.k, self.config.temperature
        if self.gating == "softmax":
            return logits.softmax(-1)
        if self.gating == "hard":
            top = logits.topk(k, dim=-1)
            return torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        if self.gating == "soft_topk":
            return soft_topk(logits, k, temperature=tau) / k
        return sparse_topk(logits, k, temperature=tau) / k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, active)``: ``active`` counts the (input, expert) pairs computed."""
        gates = self.gates(x)
        output = x.new_zeros(x.shape[0], self.config.out)
        active = gates.new_zeros((), dtype=torch.long)
        for expert, gate in enumerate(gates.unbind(-1)):
            chosen = gate.nonzero().squeeze(-1)  # the inputs this expert runs on
            active = active + chosen.numel()
            if chosen.numel():
                result = self.experts[expert](x[chosen]) * gate[chosen].unsqueeze(-1)
                output = output.index_add(0, chosen, result)
        return output, active


def _step(model, optimizer, x, y) -> tuple[float, int]:
    """One Adam step; returns (seconds, (input, expert) pairs computed)."""
    start = time.perf_counter()
    output, computed = model(x)
    loss = (output - y).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, int(computed)


def train_moe(config: MoEConfig, seed: int, gatings=GATINGS) -> list[dict[str, Any]]:
    """Train one layer per gating with Adam, in lockstep on the same batches (the gatings take
    turns at every step, in rotating order, so a busy machine slows them alike); returns per
    gating the test MSE, the median step time and the experts run per input."""
    sample = make_task(config, seed)
    models = {}
    for gating in gatings:
        torch.manual_seed(seed)  # the same initial experts and router for every gating
        model = MoE(config, gating)
        models[gating] = (model, torch.optim.Adam(model.parameters(), lr=config.lr))
    data = torch.Generator().manual_seed(seed + 1)
    times = {gating: [] for gating in gatings}
    active = {gating: [] for gating in gatings}
    for step in range(config.steps):
        x, y = sample(config.batch, data)
        order = list(gatings[step % len(gatings) :]) + list(gatings[: step % len(gatings)])
        for gating in order:
            seconds, computed = _step(*models[gating], x, y)
            times[gating].append(seconds)
            active[gating].append(computed / config.batch)
    x_test, y_test = sample(config.test_size, torch.Generator().manual_seed(seed + 2))
    results = []
    for gating, (model, _) in models.items():
        with torch.no_grad():
            test_mse = float((model(x_test)[0] - y_test).pow(2).mean())
        tail = active[gating][len(active[gating]) // 2 :]
        results.append(
            {
                "gating": gating,
                "seed": seed,
                "test_mse": test_mse,
                "step_ms_median": 1e3 * statistics.median(times[gating]),
                "experts_per_input_last_half": statistics.mean(tail),
            }
        )
    return results


def compare(config: MoEConfig, seeds: list[int], gatings=GATINGS) -> dict[str, Any]:
    """Every gating on every seed, with per-gating medians."""
    runs = [run for seed in seeds for run in train_moe(config, seed, gatings)]
    summary = {}
    for gating in gatings:
        mine = [run for run in runs if run["gating"] == gating]
        summary[gating] = {
            key: statistics.median(run[key] for run in mine)
            for key in ("test_mse", "step_ms_median", "experts_per_input_last_half")
        }
    return {"config": asdict(config), "seeds": seeds, "runs": runs, "summary": summary}
