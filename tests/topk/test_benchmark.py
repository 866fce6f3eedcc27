"""The seed baseline (reference.py) and the top-k benchmark command."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from support import seeded_randn

from gradkit.topk import benchmark
from gradkit.topk.reference import seed_find_shift, seed_topk

# --------------------------------------------------------------------------- the seed baseline


@pytest.mark.parametrize("k", [1, 3, 9])
def test_seed_probabilities_sum_to_k_with_one_shift_per_row(k):
    x = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    p = seed_topk(x, k)
    assert torch.allclose(p.sum(dim=1), torch.full((5,), float(k), dtype=torch.float64))
    assert bool(((p > 0) & (p < 1)).all())
    # p = σ(x + t) with one t per row ⇔ logit(p) − x is constant along the row, and Σp = k
    # fixes that constant uniquely: this characterises the output without any solver.
    shift = torch.logit(p) - x
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-9)
    t, _ = seed_find_shift(x, k)
    assert torch.allclose(t.expand_as(shift), shift, atol=1e-9)


def test_seed_jacobian_equals_closed_form():
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k = 2
    p = seed_topk(x, k)
    jacobian = torch.autograd.functional.jacobian(lambda t: seed_topk(t, k), x)  # (3,7,3,7)
    for row in range(3):
        v = p[row] * (1 - p[row])  # σ' from the output, not from the seed's autograd
        closed_form = torch.diag(v) - torch.outer(v, v) / v.sum()
        assert torch.allclose(jacobian[row, :, row, :], closed_form, atol=1e-10)
        others = [r for r in range(3) if r != row]
        assert jacobian[row][:, others].abs().max() == 0  # rows are independent


def test_seed_gradcheck_float64():
    x = seeded_randn(4, 6).requires_grad_()
    for k in (1, 3, 5):
        assert torch.autograd.gradcheck(lambda t, k=k: seed_topk(t, k), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("k", [0, 6, -1])
def test_seed_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must satisfy"):
        seed_topk(seeded_randn(2, 6, dtype=torch.float32), k)


def test_seed_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        seed_topk(seeded_randn(6, dtype=torch.float32), 2)


# --------------------------------------------------------------------------- the benchmark

CONTRACT_METHODS = ("gradkit", "seed", "sigmoid", "torch_topk")


def test_quick_benchmark_writes_contract_json(tmp_path, capsys):
    out, extra = tmp_path / "run", tmp_path / "extra.json"
    code = benchmark.main(
        ["--quick", "--no-peers", "--threads", "1", "--out", str(out), "--json", str(extra)]
    )
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert json.loads(extra.read_text()) == report
    assert {"config", "environment", "results"} <= report.keys()
    assert report["config"]["quick"] is True and report["config"]["threads"] == 1
    assert report["environment"]["torch"] == torch.__version__
    assert len(report["results"]) == len(benchmark.QUICK_SHAPES)
    for result, shape in zip(report["results"], benchmark.QUICK_SHAPES, strict=True):
        assert result["shape"] == [shape.batch, shape.n] and result["k"] == shape.k
        medians = {m: result["methods"][m]["median_ms"] for m in CONTRACT_METHODS}
        assert all(ms > 0 for ms in medians.values())
        assert all(result["methods"][m]["median_cpu_ms"] >= 0 for m in CONTRACT_METHODS)
        assert result["ratios_from_cpu_time"].keys() == result["ratios"].keys()
        assert result["methods"]["difftopk"] == {"skipped": "peers disabled (--no-peers)"}
        ratios = result["ratios"]
        assert ratios["speedup_vs_seed"] == pytest.approx(medians["seed"] / medians["gradkit"])
        assert ratios["x_sigmoid_pass"] == pytest.approx(medians["gradkit"] / medians["sigmoid"])
        assert ratios["x_torch_topk"] == pytest.approx(medians["gradkit"] / medians["torch_topk"])
        # gradkit and the seed compute the same operator (τ = 1) in float32.
        assert result["agreement"]["max_abs_diff_p"] < 1e-5
        assert result["agreement"]["max_abs_diff_grad"] < 1e-5
    assert (out / "ratios.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "speedup vs seed" in printed and "torch.topk" in printed
    assert "CPU time" in printed  # the one-thread run also prints the CPU-time ratios


def test_benchmark_restores_thread_count():
    before = torch.get_num_threads()
    tiny = [benchmark.Shape(4, 8, 2, "tiny")]
    benchmark.run_benchmark(tiny, threads=1, repeats=1, warmup=0, budget_s=0.01, peers=False)
    assert torch.get_num_threads() == before


def test_peers_are_measured_or_skipped_with_a_reason():
    report = benchmark.run_benchmark(
        [benchmark.Shape(4, 8, 2, "tiny")], threads=1, repeats=1, warmup=0, budget_s=0.01
    )
    for peer in ("difftopk", "pytopk"):
        entry = report["results"][0]["methods"][peer]
        assert entry.get("median_ms", 0) > 0 or entry["skipped"]


def test_difftopk_memory_guard_skips_the_big_shapes():
    fits = benchmark._difftopk_memory_bytes(benchmark.DEFAULT_SHAPES[0])
    assert fits <= benchmark.DIFFTOPK_MEMORY_BUDGET_BYTES
    for shape in benchmark.DEFAULT_SHAPES[1:]:
        assert benchmark._difftopk_memory_bytes(shape) > benchmark.DIFFTOPK_MEMORY_BUDGET_BYTES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"budget_s": 0.0}, "budget"),
    ],
)
def test_benchmark_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark.run_benchmark([benchmark.Shape(4, 8, 2, "tiny")], **kwargs)


def test_benchmark_cli_reports_bad_flag_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--quick", "--repeats", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "repeats must be an integer ≥ 1" in capsys.readouterr().err


def test_benchmarks_script_runs_the_package_benchmark(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "topk.py"
    argv = [str(script), "--quick", "--no-peers", "--no-plot", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["quick"] is True
    assert not (tmp_path / "ratios.png").exists()
    assert "speedup vs seed" in capsys.readouterr().out


def test_gradkit_bench_topk_command(tmp_path, capsys):
    from gradkit.cli import main as gradkit_main

    out = tmp_path / "run"
    args = ["bench", "topk", "--quick", "--no-peers", "--no-plot", "--threads", "1"]
    assert gradkit_main([*args, "--out", str(out)]) == 0
    assert {"config", "environment", "results"} <= json.loads(
        (out / "results.json").read_text()
    ).keys()
    assert "speedup vs seed" in capsys.readouterr().out


def test_temperature_reaches_gradkit_and_the_seed(tmp_path):
    # At τ the seed gets x/τ (its own scaling), so both compute σ((x − θ)/τ) and must agree.
    report = benchmark.run_benchmark(benchmark.QUICK_SHAPES, quick=True, temperature=0.05)
    assert report["config"]["temperature"] == 0.05
    for row in report["results"]:
        assert row["agreement"]["max_abs_diff_p"] < 1e-4
    with pytest.raises(ValueError, match="temperature"):
        benchmark.run_benchmark(benchmark.QUICK_SHAPES, quick=True, temperature=0.0)
