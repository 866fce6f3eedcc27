"""`gradkit train`: outputs and their contract keys, presets, summaries, digits, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from support import assert_png, gradkit, parse_flags

from gradkit.align import train_experiment
from gradkit.align.digits import load_digits_split, make_classifier
from gradkit.align.presets import PRESETS

DIGITS_TINY = [
    "--preset", "digits", "--seeds", "1", "--steps", "12", "--eval-every", "6",
    "--teacher-steps", "40", "--teacher-lr", "0.01", "--width", "12", "--activation", "relu,kwta",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-tiny")
    assert gradkit(["train", "--preset", "tiny", "--mode", "both", "--out", str(out)]) == 0
    return out, json.loads((out / "train.json").read_text())


def test_cli_writes_contract_json_and_plots(tiny_run):
    out, result = tiny_run
    assert_png(out / "losses.png")
    assert_png(out / "alignment_over_training.png")
    config = result["config"]
    assert config["preset"] == "tiny" and config["modes"] == ["local", "global"]
    seeds, depth = config["seeds"], config["depth"]
    for mode in ("local", "global"):
        histories = result["history"][mode]
        assert len(histories) == seeds
        for history in histories:
            steps = history["step"]
            assert steps[0] == 0 and steps[-1] == config["steps"]
            assert len(history["layer_loss"]) == len(steps)
            assert all(len(row) == depth for row in history["layer_loss"])
            assert len(history["local_global_cosine"]) == len(steps)
            assert history["total_loss"][-1] == pytest.approx(sum(history["layer_loss"][-1]))
        final = result["final"][mode]
        totals = torch.tensor([h["total_loss"][-1] for h in histories], dtype=torch.float64)
        assert final["total_loss"]["mean"] == pytest.approx(totals.mean().item())
        assert final["total_loss"]["std"] == pytest.approx(totals.std().item())
        assert len(final["layer_loss"]["mean"]) == depth
        assert final["local_global_cosine_end"]["mean"][-1] == pytest.approx(1.0)


def test_both_modes_start_from_identical_weights_and_differ_afterwards(tiny_run):
    _, result = tiny_run
    for local, global_ in zip(result["history"]["local"], result["history"]["global"], strict=True):
        assert local["layer_loss"][0] == global_["layer_loss"][0]
        assert local["local_global_cosine"][0] == global_["local_global_cosine"][0]
        assert local["total_loss"][-1] != global_["total_loss"][-1]


def test_synthetic_presets_take_their_network_from_presets_py():
    for name in ("achievable", "unachievable"):
        config = train_experiment.resolve_config(parse_flags(train_experiment, ["--preset", name]))
        network = PRESETS[name]
        for key in ("depth", "width", "activation", "init", "gain", "targets"):
            assert config[key] == network[key]
        assert config["samples"] == network["batch"] == 1000
        assert (config["steps"], config["lr"], config["momentum"]) == (10_000, 0.01, 0.9)
        assert (config["batch_size"], config["seeds"]) == (100, 3)


def test_flags_override_the_preset():
    config = train_experiment.resolve_config(
        parse_flags(
            train_experiment,
            ["--preset", "unachievable", "--steps", "7", "--lr", "0.5", "--mode", "local"],
        )
    )
    assert (config["steps"], config["lr"], config["modes"]) == (7, 0.5, ["local"])
    assert config["depth"] == PRESETS["unachievable"]["depth"]


def test_single_mode_records_only_that_mode(tmp_path):
    argv = ["train", "--preset", "tiny", "--mode", "global", "--seeds", "1", "--steps", "5"]
    assert gradkit([*argv, "--eval-every", "5", "--out", str(tmp_path), "--no-alignment"]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    assert set(result["history"]) == set(result["final"]) == {"global"}
    assert result["history"]["global"][0]["step"] == [0, 5]
    assert "local_global_cosine" not in result["history"]["global"][0]
    assert_png(tmp_path / "losses.png")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "--preset: must be one of achievable, unachievable, digits, tiny"),
        (["--mode", "distant"], "--mode: must be one of local, global, both"),
        (["--activation", "softmax"], "--activation must be one of"),
        (["--preset", "tiny", "--batch-size", "1000"], "--batch-size must be ≤"),
        (["--lr", "-1"], "--lr: must be a finite number > 0, got '-1'"),
        (["--momentum", "1"], "--momentum: must be a finite number in [0, 1)"),
        (["--steps", "0"], "--steps: must be an integer ≥ 1"),
        (["--targets", "random"], "--targets: must be one of iid, uncentered, teacher"),
        (["--teacher-lr", "-1"], "--teacher-lr: must be a finite number > 0, got '-1'"),
        (["--preset", "digits", "--samples", "5"], "--samples does not apply to --preset digits"),
        (["--preset", "digits", "--gain", "2"], "--gain does not apply to --preset digits"),
        (["--preset", "tiny", "--teacher-steps", "5"], "--teacher-steps does not apply"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_flags_exit_with_a_clear_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["train", *argv, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_digits_tiny_reports_accuracies_for_teacher_and_both_modes(tmp_path):
    pytest.importorskip("sklearn")
    assert gradkit(["train", *DIGITS_TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    final = result["final"]
    assert result["primary_activation"] == "relu"
    for stats in (final["local"], final["global"], final["teacher"]):
        accuracy = stats["test_accuracy"]
        assert 0.0 <= accuracy["mean"] <= 1.0 and accuracy["std"] == 0.0
    # A teacher trained 40 Adam steps on 10 classes is far above chance (0.1).
    assert final["teacher"]["test_accuracy"]["mean"] > 0.5
    assert set(result["final_by_activation"]) == {"relu", "kwta"}
    assert result["final_by_activation"]["relu"] == final
    kwta = result["final_by_activation"]["kwta"]
    assert 0.0 <= kwta["global"]["test_accuracy"]["mean"] <= 1.0
    history = result["history"]["local"][0]
    assert len(history["layer_loss"][0]) == 3 and history["step"] == [0, 6, 12]
    assert len(history["checkpoint_test_accuracy"]) == 3
    fig = train_experiment.losses_figure(result)
    titles = [ax.get_title() for ax in fig.axes]
    assert "students' test accuracy" in titles
    assert all(ax.get_ylabel() for ax in fig.axes if ax.axison)
    __import__("matplotlib.pyplot").pyplot.close(fig)
    assert_png(tmp_path / "losses.png")
    assert_png(tmp_path / "alignment_over_training.png")


def test_digits_split_is_standardised_disjoint_and_fixed_by_seed():
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = load_digits_split(seed=4, test_fraction=0.25)
    assert x_train.shape[1] == 64 and x_train.shape[0] + x_test.shape[0] == 1797
    assert x_test.shape[0] == round(0.25 * 1797)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    varying = x_train.std(0) > 0
    torch.testing.assert_close(x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0)[varying], torch.ones(int(varying.sum())))
    again = load_digits_split(seed=4, test_fraction=0.25)
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)
    other = load_digits_split(seed=5, test_fraction=0.25)
    assert not torch.equal(other[1], y_train)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.5)


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "gradkit\[digits\]"'):
        load_digits_split()
    with pytest.raises(SystemExit, match=r'pip install "gradkit\[digits\]"'):
        gradkit(["train", *DIGITS_TINY, "--out", str(tmp_path)])


def test_classifier_has_hidden_activation_and_linear_logits():
    net = make_classifier(64, 12, 10, "kwta", depth=3, seed=1)
    assert [layer.activation_name for layer in net] == ["kwta", "kwta", "linear"]
    assert net[-1].linear.out_features == 10 and net[0].linear.in_features == 64
    assert all(layer.linear.bias is not None for layer in net)
    with pytest.raises(ValueError, match="depth must be"):
        make_classifier(64, 12, 10, depth=1)


def test_summarize_mean_std_over_seeds():
    histories = [
        {"step": [0, 5, 10], "total_loss": [9.0, 4.0, 1.0], "layer_loss": [[5, 4], [3, 1], [1, 0]]},
        {"step": [0, 5, 10], "total_loss": [9.0, 6.0, 3.0], "layer_loss": [[5, 4], [4, 2], [2, 1]]},
    ]
    summary = train_experiment.summarize(histories)
    assert summary["total_loss"] == {"mean": 2.0, "std": pytest.approx(2**0.5)}
    assert summary["layer_loss"]["mean"] == [1.5, 0.5]
    assert summary["total_loss_at_10pct"]["mean"] == 5.0  # first checkpoint ≥ 1 step
    assert summary["total_loss_at_50pct"]["mean"] == 5.0
    one = train_experiment.summarize(histories[:1])
    assert one["total_loss"] == {"mean": 1.0, "std": 0.0}


def test_prints_its_configuration_then_progress_with_an_eta(tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--seeds", "1", "--steps", "4", "--eval-every", "2"]
    assert gradkit([*argv, "--no-alignment", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("gradkit train: ") and "steps=4" in captured.out
    lines = [line for line in captured.err.splitlines() if "checkpoints" in line]
    # 1 seed × 2 modes × checkpoints at steps 0, 2, 4.
    assert len(lines) == 6 and lines[-1].startswith("gradkit train checkpoints 6/6")
    assert all("eta" in line for line in lines)


def test_ctrl_c_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    real, calls = train_experiment.train, []

    def interrupted_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # seed 1, local: seed 0 (both modes) has finished
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_experiment, "train", interrupted_on_third)
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["train", "--preset", "tiny", "--no-alignment", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    assert "1 of 2 runs finished" in capsys.readouterr().err
    partial = json.loads((tmp_path / "train.partial.json").read_text())
    assert partial["complete"] is False
    [run] = partial["runs"]
    assert run["seed"] == 0 and set(run["history"]) == {"local", "global"}
    assert json.loads((tmp_path / "INCOMPLETE.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "train.json").exists()


def test_jobs_give_the_same_numbers_as_a_serial_run(tiny_run, tmp_path):
    _, serial = tiny_run
    argv = ["train", "--preset", "tiny", "--mode", "both", "--jobs", "2"]
    assert gradkit([*argv, "--out", str(tmp_path)]) == 0
    parallel = json.loads((tmp_path / "train.json").read_text())
    assert parallel["history"] == serial["history"]
    assert parallel["final"] == serial["final"]


def test_an_existing_out_folder_is_refused(tiny_run, capsys):
    out, _ = tiny_run
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["train", "--preset", "tiny", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_loss_plot_has_axis_labels_and_plain_log_ticks(tiny_run):
    _, result = tiny_run
    fig = train_experiment.losses_figure(result)
    fig.canvas.draw()
    shown = [ax for ax in fig.axes if ax.axison]
    assert all(ax.get_ylabel() and ax.get_yscale() == "log" for ax in shown)
    labels = [t.get_text() for t in shown[0].get_yticklabels() if t.get_text()]
    assert labels and not any("10^" in text or "$" in text for text in labels), labels
    __import__("matplotlib.pyplot").pyplot.close(fig)
