"""Learn scores by SGD so that their soft top-k reaches a target mask (the seed post's demo).

The seed post's ``sgd_update``: scores ``x`` (shape ``(batch, n)``), a 0/1 target mask ``m``
with ``k`` ones per row, the loss

    L(x) = mean_{b,i} (soft_topk(x, k, τ)_{b,i} − m_{b,i})²,

and plain gradient descent ``x ← x − η ∂L/∂x``. The seed's target was the top-k of the initial
scores, which the scores already nearly satisfy; here the default target is a **random**
k-subset per row that differs from the initial top-k, so the gradient has to move scores
across the threshold: the scores of the targeted elements rise, the others fall, and the
hard top-k sets end up equal to the targets.

The seed scaled the scores by 10 before a unit-temperature top-k; ``temperature = 0.1`` here
is the same operator (``σ((x − θ)/τ)``). The default here is a softer ``τ = 0.5`` with a larger
step: at ``τ = 0.1`` the sigmoids of elements far from the threshold are saturated, their
gradient ``p(1 − p)`` is tiny, and a random target then takes many thousands of steps.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from .. import _io
from .soft_topk import soft_topk

__all__ = ["add_arguments", "random_target", "run", "topk_mask", "train_scores"]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (same dtype as ``scores``) of the ``k`` largest entries of each row."""
    mask = torch.zeros_like(scores)
    return mask.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


def random_target(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """A random k-subset mask per row, differing from the row's current top-k where possible.

    Subsets are drawn uniformly (via a random permutation per row); a row whose draw equals
    its current top-k set is shifted to a neighbouring subset, so every row has to learn
    something whenever ``0 < k < n``.
    """
    batch, n = scores.shape
    order = torch.rand(batch, n, generator=generator, dtype=torch.float64).argsort(dim=-1)
    target = torch.zeros_like(scores).scatter_(-1, order[:, :k], 1.0)
    same = (target == topk_mask(scores, k)).all(dim=-1)
    if k < n and bool(same.any()):
        # Swap one chosen element for one not chosen: a different k-subset.
        swapped = target[same].scatter(-1, order[same, k - 1 : k], 0.0)
        target[same] = swapped.scatter(-1, order[same, k : k + 1], 1.0)
    return target


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def train_scores(
    *,
    batch: int = 4,
    n: int = 10,
    k: int = 3,
    temperature: float = 0.5,
    steps: int = 300,
    lr: float = 50.0,
    seed: int = 0,
    target: str = "random",
    log_every: int | None = None,
    print_fn=print,
) -> dict[str, Any]:
    """Run the demo and return its history and final state.

    Returns a dict with ``initial_scores``/``final_scores``, ``initial_probabilities``/
    ``final_probabilities`` (the soft top-k before and after) and ``target`` (tensors),
    ``history`` (``step``, ``loss``, ``max |Σp − k|`` per logged step), ``initial_loss``,
    ``final_loss``, ``rows_matched`` (rows whose hard top-k equals the target set) and
    ``rows_rounded_matched`` (rows whose rounded soft top-k equals the target mask).
    """
    _check("batch", batch, isinstance(batch, int) and batch >= 1, "an integer >= 1")
    _check("n", n, isinstance(n, int) and n >= 2, "an integer >= 2")
    _check("k", k, isinstance(k, int) and 0 < k < n, f"an integer with 0 < k < n = {n}")
    _check("temperature", temperature, math.isfinite(temperature) and temperature > 0, "> 0")
    _check("steps", steps, isinstance(steps, int) and steps >= 1, "an integer >= 1")
    _check("lr", lr, math.isfinite(lr) and lr > 0, "finite and > 0")
    _check("target", target, target in ("random", "initial"), "'random' or 'initial'")
    log_every = log_every or max(1, steps // 10)
    _check("log_every", log_every, isinstance(log_every, int) and log_every >= 1, ">= 1")

    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    mask = random_target(initial, k, generator) if target == "random" else topk_mask(initial, k)

    scores = torch.nn.Parameter(initial.clone())
    optimizer = torch.optim.SGD([scores], lr=lr)

    def loss_and_probabilities() -> tuple[torch.Tensor, torch.Tensor]:
        p = soft_topk(scores, k, dim=-1, temperature=temperature)
        return torch.nn.functional.mse_loss(p, mask), p

    history: list[dict[str, float]] = []

    def report(step: int, loss: float, p: torch.Tensor) -> None:
        row_sums = p.detach().sum(-1)
        sum_error = (row_sums - k).abs().max().item()
        history.append({"step": step, "loss": loss, "max_abs_sum_error": sum_error})
        print_fn(
            f"step {step:5d}  loss {loss:.3e}  Σp {row_sums.mean().item():.4f} "
            f"(max|Σp − k| {sum_error:.1e})"
        )

    with torch.no_grad():
        initial_loss_tensor, initial_p = loss_and_probabilities()
    initial_loss = initial_loss_tensor.item()
    report(0, initial_loss, initial_p)
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss, p = loss_and_probabilities()
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            report(step, loss.item(), p)  # loss and p before this step's update

    with torch.no_grad():
        final_loss, final_p = loss_and_probabilities()
    rows_matched = int((topk_mask(scores.detach(), k) == mask).all(dim=-1).sum())
    rows_rounded_matched = int((final_p.round() == mask).all(dim=-1).sum())
    return {
        "initial_scores": initial,
        "final_scores": scores.detach(),
        "target": mask,
        "initial_probabilities": initial_p,
        "final_probabilities": final_p,
        "history": history,
        "initial_loss": initial_loss,
        "final_loss": final_loss.item(),
        "rows_matched": rows_matched,
        "rows_rounded_matched": rows_rounded_matched,
        "rows": batch,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradkit demo topk``."""
    parser.add_argument("--batch", type=int, default=4, help="rows of scores (default 4)")
    parser.add_argument("--n", type=int, default=10, help="scores per row (default 10)")
    parser.add_argument("--k", type=int, default=3, help="top-k size, 0 < k < n (default 3)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="soft top-k temperature τ (default 0.5; the seed's ×10 scaling is τ = 0.1)",
    )
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (default 300)")
    parser.add_argument("--lr", type=float, default=50.0, help="SGD learning rate (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--target",
        choices=("random", "initial"),
        default="random",
        help="random k-subset differing from the initial top-k (default), or the initial "
        "top-k as in the seed",
    )
    parser.add_argument(
        "--log-every", type=int, default=None, help="print progress every N steps (steps/10)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the history and masks to FILE")
    parser.add_argument(
        "--out", metavar="DIR", help="run folder for demo.json [default: runs/demo-topk-<time>]"
    )
    _io.add_overwrite_argument(parser)


def _format_rows(matrix: torch.Tensor, rows: int) -> str:
    return "\n".join(
        "  [" + " ".join(f"{v:4.2f}" for v in row.tolist()) + "]" for row in matrix[:rows]
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed flags and print progress, final masks and the verdict."""
    # An unusable --json fails now, not after the run.
    _io.check_output_path(args.json, "--json", overwrite=getattr(args, "overwrite", False))
    with _io.run_folder(
        "demo-topk", getattr(args, "out", None), overwrite=getattr(args, "overwrite", False)
    ) as out:
        written = _run_in(args, out)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _run_in(args: argparse.Namespace, out) -> list:
    """The demo itself; returns the files written (``out/demo.json``, and ``--json``)."""
    start = time.perf_counter()
    print(
        f"soft top-k SGD demo: batch={args.batch} n={args.n} k={args.k} "
        f"τ={args.temperature} lr={args.lr} steps={args.steps} target={args.target}"
    )
    result = train_scores(
        batch=args.batch,
        n=args.n,
        k=args.k,
        temperature=args.temperature,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        target=args.target,
        log_every=args.log_every,
    )
    shown = min(result["rows"], 4)
    more = f" (first {shown} of {result['rows']} rows)" if shown < result["rows"] else ""
    print(f"\ntarget mask{more}:\n" + _format_rows(result["target"], shown))
    print("initial soft top-k:\n" + _format_rows(result["initial_probabilities"], shown))
    print("final soft top-k:\n" + _format_rows(result["final_probabilities"], shown))
    print(
        f"\nloss {result['initial_loss']:.3e} → {result['final_loss']:.3e}; hard top-k equals "
        f"the target in {result['rows_matched']}/{result['rows']} rows"
        + (" — all match" if result["rows_matched"] == result["rows"] else "")
        + f"; round(p) equals it in {result['rows_rounded_matched']}/{result['rows']}"
        + f"  ({time.perf_counter() - start:.1f}s)"
    )
    config = {k: v for k, v in vars(args).items() if k not in ("run", "overwrite")}
    payload = {"config": config, **result}
    written = [_io.write_json(out / "demo.json", payload)]
    if args.json:
        written.append(_io.write_json(args.json, payload))
    return written
