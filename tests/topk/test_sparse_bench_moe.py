"""Smoke tests of the sparse_topk benchmark and the mixture-of-experts demo (no timing checks)."""

from __future__ import annotations

import json

import pytest
import torch
from support import assert_png, gradkit

from gradkit.topk.moe import MoE, MoEConfig, make_task


def test_bench_sparse_quick(tmp_path):
    assert gradkit(["bench", "sparse", "--quick", "--out", str(tmp_path), "--repeats", "2"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    assert {"sparse_topk", "sparse_torch", "sigmoid", "soft_topk"} <= methods
    assert all(row["wall_ms"] > 0 for row in report["rows"])


def test_moe_sparse_gate_skips_experts_and_trains_router():
    config = MoEConfig(dim=6, hidden=8, out=2, experts=6, k=2, temperature=1.0)
    x, y = make_task(config, seed=0)(64, torch.Generator().manual_seed(1))
    layer = MoE(config, "sparse_topk")
    with torch.no_grad():
        layer.router.weight.mul_(4)  # a confident router: exact zeros in the gates
    output, active = layer(x)
    assert 2 * 64 <= active < 6 * 64  # at least k, fewer than every expert, per input
    (output - y).pow(2).mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    dense = MoE(config, "softmax")
    assert dense(x)[1] == 6 * 64


def test_moe_rejects_unknown_gating():
    with pytest.raises(ValueError, match="gating must be one of"):
        MoE(MoEConfig(), "argmax")


def test_demo_moe_quick(tmp_path):
    argv = ["demo", "moe", "--quick", "--steps", "5", "--out", str(tmp_path)]
    assert gradkit(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["summary"]) == {"softmax", "hard", "soft_topk", "sparse_topk"}
    assert report["summary"]["hard"]["experts_per_input_last_half"] == 2
    assert_png(tmp_path / "moe.png")
    with pytest.raises(SystemExit) as error:
        gradkit(["demo", "moe", "--k", "9", "--out", str(tmp_path)])
    assert error.value.code == 2
