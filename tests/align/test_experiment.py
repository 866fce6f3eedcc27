"""`gradkit align [run|sweep]`: outputs, statistics, flag resolution and errors (tiny nets)."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math

import numpy as np
import pytest
from support import assert_png, gradkit, parse_flags

from gradkit.align import experiment, experiment_cli
from gradkit.align.presets import ALIGN_DEFAULTS, PRESETS

TINY = ["--depth", "3", "--width", "5", "--batch", "4", "--seeds", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    assert gradkit(["align", *TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "alignment.json").read_text())


def test_run_writes_contract_json_and_plots(tiny_run):
    out, result = tiny_run
    for key in (
        "config",
        "matrices",
        "mean_by_distance",
        "fraction_all_positive",
        "band_by_distance",
        "fraction_positive_pairs",
        "per_layer",
        "decomposition",
        "environment",
        "timing",
    ):
        assert key in result, key
    depth = 3
    assert result["config"]["depth"] == depth and result["config"]["seeds"] == 2
    assert len(result["matrices"]) == 2
    for matrix in result["matrices"]:
        assert len(matrix) == depth and all(len(row) == depth for row in matrix)
        for i, j in itertools.product(range(depth), repeat=2):
            if j < i:
                assert matrix[i][j] is None  # NaN below the diagonal is written as null
            else:
                assert -1.0 - 1e-9 <= matrix[i][j] <= 1.0 + 1e-9
        assert all(math.isclose(matrix[i][i], 1.0, rel_tol=1e-9) for i in range(depth))
    assert len(result["mean_by_distance"]) == depth - 1
    assert 0.0 <= result["fraction_all_positive"] <= 1.0
    assert 0.0 <= result["fraction_positive_pairs"] <= 1.0
    assert len(result["band_by_distance"]["p05"]) == depth - 1
    assert len(result["per_layer"]["random_baseline"]) == depth
    assert result["environment"]["torch"]
    assert_png(out / "alignment.png")
    assert_png(out / "by_distance.png")


def test_summary_statistics_match_an_independent_computation(tiny_run):
    _, result = tiny_run
    matrices = [
        np.array([[np.nan if v is None else v for v in row] for row in m])
        for m in result["matrices"]
    ]
    depth = len(matrices[0])
    for d in range(1, depth):
        values = [m[i, i + d] for m in matrices for i in range(depth - d)]
        assert result["mean_by_distance"][d - 1] == pytest.approx(sum(values) / len(values))
        low, high = (
            result["band_by_distance"]["p05"][d - 1],
            result["band_by_distance"]["p95"][d - 1],
        )
        assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12
    pairs = [[m[i, j] for i in range(depth) for j in range(i + 1, depth)] for m in matrices]
    positive = [v > 0 for seed in pairs for v in seed]
    assert result["fraction_positive_pairs"] == pytest.approx(sum(positive) / len(positive))
    all_positive = [all(v > 0 for v in seed) for seed in pairs]
    assert result["fraction_all_positive"] == pytest.approx(sum(all_positive) / len(all_positive))
    # The decomposition's four terms add up to the cosine, so their means add up too.
    decomposition = result["decomposition"]
    total = np.sum([decomposition[t] for t in ("in_in", "in_ex", "ex_in", "ex_ex")], axis=0)
    np.testing.assert_allclose(total, result["mean_by_distance"], atol=1e-9)


def test_summarize_on_hand_made_matrices():
    nan = math.nan
    first = [[1, 0.5, 0.2], [nan, 1, 0.4], [nan, nan, 1]]
    second = [[1, 0.3, -0.1], [nan, 1, 0.6], [nan, nan, 1]]
    summary = experiment.summarize(np.array([first, second]))
    assert summary.mean_by_distance == pytest.approx([(0.5 + 0.4 + 0.3 + 0.6) / 4, 0.05])
    assert summary.fraction_positive_pairs == pytest.approx(5 / 6)
    assert summary.fraction_all_positive == pytest.approx(0.5)
    assert summary.positive_pairs_per_seed == [3, 2]
    with pytest.raises(ValueError, match="seeds, L, L"):
        experiment.summarize(np.ones((2, 3, 4)))


def test_same_seeds_reproduce_and_first_seed_changes_the_draw(tmp_path):
    argv = ["align", *TINY, "--no-decompose", "--no-plots"]
    gradkit([*argv, "--out", str(tmp_path / "a")])
    gradkit([*argv, "--out", str(tmp_path / "b")])
    gradkit([*argv, "--first-seed", "5", "--out", str(tmp_path / "c")])
    a, b, c = (json.loads((tmp_path / n / "alignment.json").read_text()) for n in "abc")
    assert a["matrices"] == b["matrices"]
    assert a["matrices"] != c["matrices"]
    assert a["decomposition"] is None
    assert not list((tmp_path / "a").glob("*.png"))  # --no-plots


def test_preset_then_flags_override_it():
    settings = experiment_cli.resolve_settings(
        parse_flags(experiment_cli, ["--preset", "achievable", "--width", "50"])
    )
    achievable = PRESETS["achievable"]
    assert settings["width"] == (50,)  # explicit flag beats the preset
    for key in ("depth", "activation", "gain", "targets", "batch"):
        assert settings[key] == (achievable[key],), key
    settings = experiment_cli.resolve_settings(
        parse_flags(experiment_cli, ["--preset", "unachievable", "--targets", "teacher"])
    )
    assert settings["targets"] == ("teacher",)
    assert settings["activation"] == (PRESETS["unachievable"]["activation"],)
    defaults = experiment_cli.resolve_settings(parse_flags(experiment_cli, []))
    for key in ("depth", "width", "activation", "init", "targets", "batch", "seeds"):
        assert defaults[key] == (ALIGN_DEFAULTS[key],), key
    assert experiment_cli.resolve_settings(parse_flags(experiment_cli, ["--bias"]))["bias"] == (
        True,
    )


def test_gain_auto_resolves_to_the_activation_default(tmp_path):
    argv = ["align", *TINY, "--activation", "relu", "--no-decompose", "--no-plots"]
    gradkit([*argv, "--out", str(tmp_path)])
    config = json.loads((tmp_path / "alignment.json").read_text())["config"]
    assert config["gain"] == pytest.approx(math.sqrt(2.0))
    assert config["gain_requested"] is None


def test_sweep_writes_one_row_per_grid_point(tmp_path, capsys):
    argv = [
        "align",
        "sweep",
        "--activation",
        "linear,tanh",
        "--width",
        "3,4",
        "--depth",
        "3",
        "--batch",
        "4",
        "--seeds",
        "2",
        "--no-decompose",
        "--out",
        str(tmp_path),
    ]
    assert gradkit(argv) == 0
    table = capsys.readouterr().out
    assert "| width | activation |" in table
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["config"]["swept"] == ["width", "activation"]
    grid = [(row["setting"]["width"], row["setting"]["activation"]) for row in result["rows"]]
    assert sorted(grid) == sorted(itertools.product([3, 4], ["linear", "tanh"]))
    for row in result["rows"]:
        assert len(row["mean_by_distance"]) == 2
        assert row["cos_d1"] == row["mean_by_distance"][0]
        assert row["cos_dmax"] == row["mean_by_distance"][-1]
    with open(tmp_path / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {"width", "activation", "cos_d1", "fraction_all_positive"} <= set(rows[0])
    assert_png(tmp_path / "sweep.png")


@pytest.mark.parametrize(
    ("argv", "flag", "allowed"),
    [
        (["--activation", "sigmoid"], "--activation", "linear"),
        (["--init", "xavier"], "--init", "orthogonal"),
        (["--targets", "random"], "--targets", "teacher"),
        (["--width", "0"], "--width", "≥ 1"),
        (["--depth", "1"], "--depth", "≥ 2"),
        (["--gain", "-1"], "--gain", "> 0"),
        (["--target-scale", "nan"], "--target-scale", "> 0"),
        (["--preset", "nope"], "--preset", "gist20"),
        (["--width", "30,100"], "--width", "gradkit align sweep"),  # a list outside sweep mode
        (["sweep", "--seeds", "2,3"], "--seeds", "one value"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, flag, allowed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["align", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and allowed in message, message
    assert not (tmp_path / "alignment.json").exists()


def _setting(**changes) -> dict:
    base = dict(
        depth=8,
        width=30,
        activation="linear",
        init="gaussian",
        gain=None,
        bias=False,
        targets="iid",
        target_scale=1.0,
        batch=50,
    )
    return {**base, **changes}


def test_findings_hold_on_a_small_network():
    """The README's qualitative findings, on an 8-layer net (fixed seeds, so deterministic)."""
    seeds = range(4)
    linear = experiment.measure_setting(_setting(), seeds)["summary"]
    assert linear.fraction_all_positive == 1.0
    assert linear.mean_by_distance[0] > 0.5
    assert linear.mean_by_distance[0] > linear.mean_by_distance[-1] > 0
    # Orthogonal weights make W Wᵀ = I, the gist's "autoencoder" condition: no decay with j − i.
    orthogonal = experiment.measure_setting(_setting(init="orthogonal"), seeds)["summary"]
    assert orthogonal.mean_by_distance[-1] == pytest.approx(
        orthogonal.mean_by_distance[0], abs=0.05
    )
    # Saturating tanh with targets large against the states: the alignment is gone.
    tanh = experiment.measure_setting(_setting(activation="tanh", target_scale=4.0), seeds)
    assert abs(tanh["summary"].mean_by_distance[-1]) < 0.05
    assert tanh["summary"].fraction_all_positive == 0.0
    # With iid targets the cross terms average out: the cosine is the internal·internal term.
    result = experiment.measure_setting(_setting(), seeds)
    decomposition = result["decomposition"]
    np.testing.assert_allclose(
        decomposition["in_in"], result["summary"].mean_by_distance, atol=0.05
    )


def test_run_accepts_a_hand_made_namespace(tmp_path):
    args = argparse.Namespace(depth=3, width="4", batch=4, seeds=1, out=str(tmp_path), plots=False)
    assert experiment_cli.run(args) == 0
    result = json.loads((tmp_path / "alignment.json").read_text())
    assert result["config"]["width"] == 4 and len(result["matrices"]) == 1
    with pytest.raises(ValueError, match="--activation"):
        experiment_cli.run(argparse.Namespace(activation="sigmoid", out=str(tmp_path)))


def test_an_existing_out_folder_is_refused_unless_overwrite(tmp_path, capsys):
    argv = ["align", *TINY, "--no-decompose", "--no-plots", "--out", str(tmp_path)]
    assert gradkit(argv) == 0
    first = (tmp_path / "alignment.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        gradkit([*argv, "--first-seed", "3"])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "alignment.json").read_text() == first
    assert gradkit([*argv, "--first-seed", "3", "--overwrite"]) == 0
    assert (tmp_path / "alignment.json").read_text() != first


@pytest.mark.parametrize(
    ("argv", "flag", "allowed"),
    [
        (["--first-seed", "99999999999999999999"], "--first-seed", "an integer in [0, "),
        (["--first-seed", "-1"], "--first-seed", "an integer in [0, "),
        (["--threads", "0"], "--threads", "in [1, 1024]"),
        (["--threads", "many"], "--threads", "'auto'"),
        (["--device", "tpu"], "--device", "cuda"),
    ],
)
def test_bad_run_flags_exit_2_naming_the_flag(argv, flag, allowed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["align", *TINY, *argv, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flag in message and allowed in message, message
    assert not (tmp_path / "x").exists()


def test_the_last_seed_must_fit_the_seed_range(capsys):
    top = experiment.MAX_SEED
    assert experiment.check_seeds(top, 1) == [top]
    with pytest.raises(ValueError, match="--first-seed \\+ --seeds − 1 must be ≤"):
        experiment.check_seeds(top, 2)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--batch", "10000000"], "--batch 10000000"),
        (["--depth", "10000"], "--depth 10000"),
        (["--width", "100000"], "--width 100000"),
    ],
)
def test_a_setting_too_big_for_memory_is_refused_at_once(
    argv, named, tmp_path, monkeypatch, capsys
):
    from gradkit import _resources

    monkeypatch.setattr(_resources, "available_memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["align", *argv, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert named in message and "needs about" in message and "8.0 GiB" in message, message
    assert not (tmp_path / "x").exists()


def test_memory_estimate_grows_with_every_size():
    base = _setting()
    small = experiment.estimate_bytes(base, 10)
    for key in ("depth", "width", "batch"):
        assert experiment.estimate_bytes({**base, key: base[key] * 10}, 10) > small
    assert experiment.estimate_bytes(base, 100) > small
    # At least the weights and the (seeds, L, L) matrices themselves.
    weights = 8 * base["depth"] * base["width"] ** 2
    assert small > weights + 8 * 10 * base["depth"] ** 2


def test_threads_and_device_are_recorded(tmp_path):
    argv = ["align", *TINY, "--no-plots", "--threads", "1", "--device", "cpu"]
    assert gradkit([*argv, "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "alignment.json").read_text())["config"]
    assert config["threads"] == 1 and config["device"] == "cpu"


def test_a_failed_run_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "measure_setting", broken)
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["align", *TINY, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 130
    assert not (tmp_path / "x").exists()


def test_ctrl_c_keeps_the_finished_seeds(tmp_path, monkeypatch, capsys):
    real, calls = experiment._measure_one, []

    def interrupted_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(experiment, "_measure_one", interrupted_on_third)
    argv = ["align", "--depth", "3", "--width", "4", "--batch", "4", "--seeds", "4"]
    with pytest.raises(SystemExit) as exit_info:
        gradkit([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    assert "2 seeds finished" in capsys.readouterr().err
    partial = json.loads((tmp_path / "alignment.partial.json").read_text())
    assert partial["complete"] is False and partial["config"]["seed_indices"] == [0, 1]
    assert len(partial["matrices"]) == 2
    assert json.loads((tmp_path / "INCOMPLETE.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "alignment.json").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message without a GPU"
)
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["align", *TINY, "--device", "cuda", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--device cuda" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (runs where present)"
)
@pytest.mark.parametrize("activation", ["linear", "tanh", "kwta"])
def test_cuda_matches_cpu_to_float64_rounding(activation):
    setting = _setting(activation=activation, depth=5)
    cpu = experiment.measure_setting(setting, [0, 1], device="cpu")
    cuda = experiment.measure_setting(setting, [0, 1], device="cuda")
    np.testing.assert_allclose(cuda["matrices"], cpu["matrices"], rtol=0, atol=1e-10)
    for term in ("in_in", "ex_ex"):
        np.testing.assert_allclose(
            cuda["decomposition"][term], cpu["decomposition"][term], rtol=0, atol=1e-10
        )
