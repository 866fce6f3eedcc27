"""The seed baseline (reference.py) and the top-k benchmark command."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import PNG_SIGNATURE, seeded_randn

from gradkit.topk import _native, benchmark, benchmark_grid
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

CONTRACT_METHODS = ("gradkit", "seed", "sigmoid", "torch_topk", "sparse_topk")


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
    # the sigmoid pass's speed depends on PyTorch's vector width: recorded and printed
    capability = report["environment"]["cpu_capability"]
    assert capability == torch.backends.cpu.get_cpu_capability()
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
        # Both operators in one table (issue 12): sparse_topk beside the same sigmoid pass.
        sparse_passes = medians["sparse_topk"] / medians["sigmoid"]
        assert ratios["sparse_x_sigmoid_pass"] == pytest.approx(sparse_passes)
        assert ratios["sparse_speedup_vs_budget_bisect"] is None  # --no-peers
        assert result["methods"]["budget_bisect"] == {"skipped": "peers disabled (--no-peers)"}
        assert result["agreement"]["max_abs_sum_error_sparse"] < 1e-5 * shape.n
        assert set(result["targets"]) >= {"sparse_x_sigmoid_pass_met"}
        # gradkit and the seed compute the same operator (τ = 1) in float32.
        assert result["agreement"]["max_abs_diff_p"] < 1e-5
        assert result["agreement"]["max_abs_diff_grad"] < 1e-5
    assert (out / "ratios.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "speedup vs seed" in printed and "torch.topk" in printed
    assert "gradkit.sparse_topk ms" in printed and "sparse_topk × sigmoid pass" in printed
    assert "CPU time" in printed  # the one-thread run also prints the CPU-time ratios
    assert f"torch's CPU kernels {capability}" in printed


def test_cpu_capability_is_unknown_where_torch_cannot_tell(monkeypatch):
    from gradkit import _bench

    assert _bench.cpu_capability() == torch.backends.cpu.get_cpu_capability()
    monkeypatch.delattr(torch.backends.cpu, "get_cpu_capability")
    assert _bench.cpu_capability() == "unknown"
    assert _bench.environment(1)["cpu_capability"] == "unknown"


def test_benchmark_restores_thread_count():
    before = torch.get_num_threads()
    tiny = [benchmark.Shape(4, 8, 2, "tiny")]
    benchmark.run_benchmark(tiny, threads=1, repeats=1, warmup=0, budget_s=0.01, peers=False)
    assert torch.get_num_threads() == before


def test_peers_are_measured_or_skipped_with_a_reason():
    report = benchmark.run_benchmark(
        [benchmark.Shape(4, 8, 2, "tiny")], threads=1, repeats=1, warmup=0, budget_s=0.01
    )
    result = report["results"][0]
    for peer in ("difftopk", "pytopk", "budget_bisect"):
        entry = result["methods"][peer]
        assert entry.get("median_ms", 0) > 0 or entry["skipped"]
    bisect = result["methods"]["budget_bisect"].get("median_ms")
    expected = None if bisect is None else bisect / result["methods"]["sparse_topk"]["median_ms"]
    assert result["ratios"]["sparse_speedup_vs_budget_bisect"] == pytest.approx(expected)


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


# --------------------------------------------------------------------------- honest reports


def _busy_machine(monkeypatch):
    """Make the benchmark see a 1-minute load average far above the core count."""
    monkeypatch.setattr(benchmark._bench, "load_average", lambda: 50.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_busy_machine_gives_no_verdict_and_fitting_advice(monkeypatch, threads):
    _busy_machine(monkeypatch)
    tiny = [benchmark.Shape(4, 8, 2, "tiny")]
    report = benchmark.run_benchmark(tiny, threads=threads, repeats=1, warmup=0, budget_s=0.01)
    summary = report["summary"]
    assert not summary["reliable"] and summary["flags"][0].startswith("machine busy")
    assert summary["speedup_vs_seed_met_everywhere"] is None
    text = benchmark.format_table(report)
    assert "UNRELIABLE RUN" in text and "Targets not judged" in text
    assert ": met" not in text and "NOT met" not in text
    assert "CPU time" in text  # the CPU-time ratios are shown beside the wall-time ones
    assert ("--threads 1" in text) == (threads > 1)


def test_flagged_runs_plot_no_wall_time_numbers(monkeypatch, tmp_path):
    _busy_machine(monkeypatch)
    tiny = [benchmark.Shape(4, 8, 2, "tiny")]
    one = benchmark.run_benchmark(tiny, threads=1, repeats=1, warmup=0, budget_s=0.01)
    assert benchmark.plotted_ratios(one) == "ratios_from_cpu_time"
    assert benchmark.plot_ratios(one, tmp_path / "one.png").stat().st_size > 0
    two = benchmark.run_benchmark(tiny, threads=2, repeats=1, warmup=0, budget_s=0.01)
    assert benchmark.plotted_ratios(two) is None
    assert benchmark.plot_ratios(two, tmp_path / "two.png") is None
    assert not (tmp_path / "two.png").exists()


def test_quiet_machine_is_judged(monkeypatch):
    monkeypatch.setattr(benchmark._bench, "load_average", lambda: 0.0)
    monkeypatch.setattr(benchmark, "NOISE_RATIO", math.inf)  # no shape counts as descheduled
    tiny = [benchmark.Shape(4, 8, 2, "tiny")]
    report = benchmark.run_benchmark(tiny, threads=1, repeats=1, warmup=0, budget_s=0.01)
    assert report["summary"]["reliable"] and report["summary"]["flags"] == []
    assert report["summary"]["speedup_vs_seed_met_everywhere"] in (True, False)
    assert "Target ≥ 10× faster than the seed at every shape:" in benchmark.format_table(report)


# --------------------------------------------------------------------------- --device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CUDA is not available"):
        benchmark_grid.run_grid(ns=[16], spreads=[1.0], device="cuda")


@pytest.mark.parametrize("device", ["tpu", "nonsense", "cuda:x"])
def test_unknown_device_is_rejected(device):
    with pytest.raises(ValueError, match="--device must be"):
        benchmark.run_benchmark([benchmark.Shape(4, 8, 2, "tiny")], device=device)


# --------------------------------------------------------------------------- the grid


def test_grid_budgets_follow_the_issue():
    assert benchmark_grid.grid_budgets(16) == [1, 2, 10, 8, 15]
    assert benchmark_grid.grid_budgets(1000) == [1, 2, 10, 100, 500, 999]
    assert benchmark_grid.grid_budgets(10**6) == [1, 2, 10, 10**4, 10**5, 5 * 10**5, 10**6 - 1]


def _tiny_grid(**kwargs):
    settings = dict(ns=[16, 64], spreads=[1.0, 100.0], dtypes=["float32"], threads=[1])
    settings.update(elements=128, repeats=1)
    settings.update(kwargs)
    return benchmark_grid.run_grid(**settings)


def test_grid_report_has_every_cell_and_its_ratios():
    report = _tiny_grid()
    (setting,) = report["settings"]
    assert setting["dtype"] == "float32" and setting["threads"] == 1
    cases = {(c["n"], c["case"], c["k"], c["spread"]) for c in setting["cells"]}
    for n in (16, 64):
        for spread in (1.0, 100.0):
            for k in benchmark_grid.grid_budgets(n):
                assert (n, "k", k, spread) in cases
            assert (n, "k per row", 0, spread) in cases
            assert (n, "half -inf", max(1, n // 10), spread) in cases
            assert (n, "+inf", max(2, n // 10), spread) in cases
            assert (n, "nan", max(2, n // 10), spread) in cases
    for cell in setting["cells"]:
        assert cell["batch"] == max(1, round(128 / cell["n"]))
        # (the ratio of the least times; the medians' ratio beside it)
        assert cell["x_sigmoid"] == pytest.approx(
            cell["gradkit_least_ms"] / cell["sigmoid_least_ms"]
        )
        assert cell["x_sigmoid_median"] == pytest.approx(cell["gradkit_ms"] / cell["sigmoid_ms"])
        assert cell["gradkit_least_ms"] <= cell["gradkit_ms"]
        assert cell["x_sigmoid_cpu"] >= 0
        assert cell["special_rows"] == (cell["case"] in ("+inf", "nan"))
    worst = setting["worst"]
    assert worst["kernel_cpu"]["x_sigmoid_cpu"] == max(
        c["x_sigmoid_cpu"] for c in setting["cells"] if not c["special_rows"]
    )
    assert (setting["targets"] is None) == bool(setting["flags"])


def test_grid_on_a_busy_machine_is_flagged_and_not_judged(monkeypatch, tmp_path):
    _busy_machine(monkeypatch)
    report = _tiny_grid()
    (setting,) = report["settings"]
    assert not setting["reliable"] and setting["targets"] is None
    text = benchmark_grid.format_grid(report)
    assert "UNRELIABLE RUN" in text and "Targets not judged" in text
    assert ": met" not in text and "--threads 1" not in text  # (it ran with one thread)
    assert "worst cell, × sigmoid pass (CPU time)" in text
    # One thread on a busy machine: the heatmap shows CPU-time ratios, never wall-time ones.
    assert benchmark_grid._plotted_ratio(setting) == ("x_sigmoid_cpu", "CPU time")
    wall = dict(setting, threads=2)
    assert benchmark_grid._plotted_ratio(wall)[0] == "x_sigmoid"
    assert all(benchmark_grid._plotted(c, "x_sigmoid", wall) is None for c in setting["cells"])
    assert benchmark_grid.plot_grid(report, setting, tmp_path / "h.png").stat().st_size > 0


def test_flagged_cells_are_not_drawn():
    setting = {"reliable": True}
    cell = {"x_sigmoid": 2.0, "x_sigmoid_cpu": 1.9, "flagged": None}
    assert benchmark_grid._plotted(cell, "x_sigmoid", setting) == 2.0
    assert benchmark_grid._plotted(dict(cell, flagged="descheduled"), "x_sigmoid", setting) is None
    assert benchmark_grid._plotted(cell, "x_sigmoid", {"reliable": False}) is None


def test_grid_command_writes_json_and_one_heatmap_per_setting(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark_grid, "QUICK_NS", (16,))
    monkeypatch.setattr(benchmark_grid, "QUICK_SPREADS", (1.0, 1000.0))
    monkeypatch.setattr(benchmark_grid, "QUICK_ELEMENTS", 64)
    out = tmp_path / "grid"
    args = ["--grid", "--quick", "--threads", "1", "--repeats", "1", "--out", str(out)]
    assert benchmark.main(args) == 0  # --op soft by default
    reports = json.loads((out / "results.json").read_text())
    assert list(reports) == ["soft"]
    report = reports["soft"]
    assert report["config"]["quick"] is True and report["config"]["ns"] == [16]
    assert report["config"]["op"] == "soft"
    assert [(s["dtype"], s["threads"]) for s in report["settings"]] == [
        ("float32", 1),
        ("float64", 1),
    ]
    for name in ("grid_soft_float32_1thread.png", "grid_soft_float64_1thread.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    printed = capsys.readouterr().out
    assert "worst cell, × sigmoid pass (wall time)" in printed
    assert "cost of soft_topk forward+backward" in printed
    assert f"torch's CPU kernels {report['environment']['cpu_capability']}" in printed


def test_grid_command_op_both_keys_the_json_and_heatmaps_by_op(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark_grid, "QUICK_NS", (16,))
    monkeypatch.setattr(benchmark_grid, "QUICK_SPREADS", (1.0,))
    monkeypatch.setattr(benchmark_grid, "QUICK_ELEMENTS", 32)
    out = tmp_path / "grid"
    args = ["--grid", "--op", "both", "--quick", "--threads", "1", "--repeats", "1"]
    assert benchmark.main([*args, "--out", str(out)]) == 0
    reports = json.loads((out / "results.json").read_text())
    assert list(reports) == ["soft", "sparse"]
    for op, report in reports.items():
        assert report["config"]["op"] == op
        assert {s["op"] for s in report["settings"]} == {op}
        for dtype in ("float32", "float64"):
            assert (out / f"grid_{op}_{dtype}_1thread.png").read_bytes().startswith(PNG_SIGNATURE)
    printed = capsys.readouterr().out
    assert "cost of soft_topk forward+backward" in printed
    assert "cost of sparse_topk forward+backward" in printed
    assert "## sparse_topk: float32, 1 thread(s), cpu" in printed


def test_sparse_grid_has_every_cell_no_seed_and_its_own_target(monkeypatch):
    report = _tiny_grid(op="sparse")
    assert report["config"]["op"] == "sparse"
    (setting,) = report["settings"]
    assert setting["op"] == "sparse"
    cases = {(c["n"], c["case"], c["k"], c["spread"]) for c in setting["cells"]}
    soft_cases = {
        (c["n"], c["case"], c["k"], c["spread"]) for c in _tiny_grid()["settings"][0]["cells"]
    }
    assert cases == soft_cases
    assert all("speedup_vs_seed" not in c for c in setting["cells"])
    for cell in setting["cells"]:
        assert cell["x_sigmoid"] == pytest.approx(cell["gradkit_ms"] / cell["sigmoid_ms"])
    # The targets: 3× in both dtypes, none against the seed.
    cells = [dict(c, x_sigmoid=3.5, special_rows=False) for c in setting["cells"]]
    assert benchmark_grid._targets("float64", cells, "sparse")["x_sigmoid_met"] is False
    assert benchmark_grid._targets("float64", cells, "soft")["x_sigmoid_met"] is True
    assert benchmark_grid._targets("float32", cells, "sparse")["speedup_vs_seed_met"] is None
    text = benchmark_grid.format_grid(report)
    assert "sparse_topk" in text and "speedup vs the seed" not in text
    with pytest.raises(ValueError, match="op must be one of"):
        benchmark_grid.run_grid(ns=[16], spreads=[1.0], op="dense")


def test_op_flag_without_grid_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--op", "sparse", "--quick"])
    assert exit_info.value.code == 2
    assert "--op sparse applies to --grid only" in capsys.readouterr().err


def test_spreads_flag_sets_the_grid_columns(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark_grid, "QUICK_NS", (16,))
    monkeypatch.setattr(benchmark_grid, "QUICK_ELEMENTS", 32)
    out = tmp_path / "grid"
    args = ["--grid", "--quick", "--threads", "1", "--repeats", "1", "--no-plot"]
    assert benchmark.main([*args, "--spreads", "20", "40.5", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())["soft"]
    assert report["config"]["spreads"] == [20.0, 40.5]
    for setting in report["settings"]:
        assert {cell["spread"] for cell in setting["cells"]} == {20.0, 40.5}
    assert "| spread 20 | spread 40.5 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "--spreads", "0"], "--spreads: must be a finite number > 0, got '0'"),
        (["--grid", "--spreads", "inf"], "--spreads: must be a finite number > 0, got 'inf'"),
        (["--quick", "--spreads", "3"], "--spreads applies to --grid only"),
    ],
)
def test_bad_spreads_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gradkit_bench_topk_grid_command(monkeypatch, tmp_path):
    from gradkit.cli import main as gradkit_main

    monkeypatch.setattr(benchmark_grid, "QUICK_NS", (16,))
    monkeypatch.setattr(benchmark_grid, "QUICK_SPREADS", (1.0,))
    monkeypatch.setattr(benchmark_grid, "QUICK_ELEMENTS", 32)
    out = tmp_path / "grid"
    args = ["bench", "topk", "--grid", "--quick", "--no-plot", "--repeats", "1"]
    assert gradkit_main([*args, "--out", str(out)]) == 0
    settings = json.loads((out / "results.json").read_text())["soft"]["settings"]
    assert [s["threads"] for s in settings] == [1, 1]  # --quick: one thread by default
    assert not list(out.glob("*.png"))


def test_load_flag_discounts_this_process_own_threads(monkeypatch):
    monkeypatch.setattr(benchmark._bench.os, "cpu_count", lambda: 4)
    assert benchmark._bench.load_flag(0.5, 1.4, threads=1) is None  # (after: its own thread)
    assert benchmark._bench.load_flag(4.0, 1.0, threads=1).startswith("machine busy")
    # 3.0 before, of which 2 were this process's previous setting: 1.0 from others.
    assert benchmark._bench.load_flag(3.0, 2.3, threads=2, own_before=2) is None
    assert benchmark._bench.load_flag(3.0, 2.3, threads=2, own_before=0) is not None
    assert benchmark._bench.load_flag(None, None, threads=2) is None


def test_compile_benchmark_script_plumbing(tmp_path, capsys):
    """``benchmarks/compile.py`` on one tiny shape: every step runs, the ratios follow from the
    medians it reports (no timing is judged)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "compile.py"
    namespace = runpy.run_path(str(script))
    namespace["SHAPES"][:] = [(4, 8, 2)]
    out = tmp_path / "compile.json"
    assert namespace["main"](["--repeats", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for clock in ("wall", "cpu"):
        eager, compiled = row[f"layer_eager_{clock}_ms"], row[f"layer_compiled_{clock}_ms"]
        assert eager > 0 and compiled > 0
        assert row[f"layer_compiled_over_eager_{clock}"] == pytest.approx(compiled / eager)
        floor = row[f"floor_compiled_{clock}_ms"] - row[f"floor_eager_{clock}_ms"]
        less_floor = row[f"layer_compiled_less_floor_over_eager_{clock}"]
        assert less_floor == pytest.approx((compiled - floor) / eager)
    assert "| 4x8 | 2 |" in capsys.readouterr().out


def test_overhead_benchmark_script_plumbing(tmp_path, capsys):
    """``benchmarks/overhead.py`` on one tiny shape: every method runs, the derived columns
    follow from the medians it reports (no timing is judged)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
    namespace = runpy.run_path(str(script))
    namespace["SHAPES"][:] = [(4, 8, 2)]
    out = tmp_path / "overhead.json"
    assert namespace["main"](["--repeats", "1", "--calls", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for clock in ("wall", "cpu"):
        assert all(row[f"{name}_{clock}_us"] > 0 for name in namespace["METHODS"])
        for name in ("soft_topk", "sparse_topk"):
            ours, floor = row[f"{name}_{clock}_us"], row[f"function_{clock}_us"]
            assert row[f"{name}_over_function_{clock}_us"] == pytest.approx(ours - floor)
            sigmoid = row[f"sigmoid_{clock}_us"]
            assert row[f"{name}_x_sigmoid_{clock}"] == pytest.approx(ours / sigmoid)
    assert "| 4x8 | 2 |" in capsys.readouterr().out


def test_overhead_benchmark_rejects_bad_flags_before_running(capsys):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script))["main"](["--calls", "0"])
    assert exit_info.value.code == 2
    assert "--calls must be an integer ≥ 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--threads", "0"], "--threads must be an integer ≥ 1"), (["--json"], "already exists")],
)
def test_compile_benchmark_rejects_bad_flags_before_running(tmp_path, capsys, flags, message):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "compile.py"
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    if flags == ["--json"]:
        flags = ["--json", str(existing)]
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script))["main"](flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert existing.read_text() == "{}"  # an existing result is never replaced unasked


def _kernels_script() -> dict:
    return runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"))


@pytest.mark.skipif(not _native.available(), reason=f"fused CPU kernel {_native.status()}")
def test_kernels_benchmark_builds_both_revisions_and_compares_them(tmp_path, capsys):
    """``benchmarks/kernels.py --base HEAD`` on two tiny cases: both kernels build from their
    sources (the working tree's and git's), every entry runs, and the same source twice gives
    the same outputs (no timing is judged)."""
    root = Path(__file__).resolve().parents[2]
    if subprocess.run(["git", "-C", str(root), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    namespace = _kernels_script()
    namespace["SOLVES"][:] = [("soft", 16, 2, 3.0, "float32"), ("sparse", 64, 6, 1.0, "float64")]
    namespace["VJPS"][:] = [("soft", 8, 2, 3.0, "float32"), ("sparse", 16, 4, 3.0, "float32")]
    out = tmp_path / "kernels.json"
    argv = ["--base", "HEAD", "--repeats", "1", "--elements", "256", "--json", str(out)]
    assert namespace["main"](argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["entry"], r["n"]) for r in rows] == [
        ("soft", "solve", 16),
        ("sparse", "solve", 64),
        ("soft", "vjp", 8),
        ("sparse", "vjp", 16),
    ]
    for row in rows:
        assert row["base_ms"] > 0 and row["new_ms"] > 0
        assert row["new_over_base"] == pytest.approx(row["new_ms"] / row["base_ms"])
    unchanged = ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", namespace["SOURCE"]]
    if subprocess.run(unchanged).returncode == 0:  # (the same source twice)
        assert all(row["max_abs_difference"] == 0 for row in rows)
    assert "| soft solve | 16 | 2 |" in capsys.readouterr().out


def test_kernels_benchmark_names_a_base_without_the_kernel(capsys):
    main = _kernels_script()["main"]
    assert main(["--base", "no-such-revision-xyz", "--repeats", "1"]) == 2
    assert "--base 'no-such-revision-xyz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--repeats", "1"])
    assert exit_info.value.code == 2
    assert "--base" in capsys.readouterr().err
