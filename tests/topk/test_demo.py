"""The soft top-k SGD demo (``gradkit demo topk``)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gradkit.topk import demo


def test_random_target_has_k_ones_and_differs_from_the_initial_topk():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 5, dtype=torch.float64, generator=generator)
    for k in (1, 2, 4):
        target = demo.random_target(scores, k, generator)
        assert bool((target.sum(-1) == k).all())
        assert bool(((target == 0) | (target == 1)).all())
        differs = (target != demo.topk_mask(scores, k)).any(dim=-1)
        assert bool(differs.all())


def test_sgd_lowers_the_loss_and_learns_the_target():
    result = demo.train_scores(
        batch=3, n=6, k=2, steps=150, temperature=0.5, lr=50.0, seed=1, print_fn=lambda _: None
    )
    assert result["final_loss"] < 0.1 * result["initial_loss"]
    assert result["rows_matched"] == result["rows_rounded_matched"] == result["rows"] == 3
    # the soft top-k keeps Σp = k all along
    assert max(h["max_abs_sum_error"] for h in result["history"]) < 1e-8
    assert torch.allclose(result["final_probabilities"].round(), result["target"])


def test_initial_target_is_the_seed_setting():
    result = demo.train_scores(
        batch=2, n=5, k=2, steps=5, target="initial", seed=0, print_fn=lambda _: None
    )
    assert torch.equal(result["target"], demo.topk_mask(result["initial_scores"], 2))
    assert result["final_loss"] < result["initial_loss"]


def test_run_prints_progress_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    path, out = tmp_path / "demo.json", tmp_path / "run"
    flags = ["--batch", "2", "--n", "6", "--k", "2", "--steps", "20", "--json", str(path)]
    args = parser.parse_args([*flags, "--out", str(out)])
    assert demo.run(args) == 0
    assert json.loads((out / "demo.json").read_text())["config"]["steps"] == 20
    printed = capsys.readouterr().out
    assert "step    20" in printed and "final soft top-k" in printed and "rows" in printed
    saved = json.loads(path.read_text())
    assert saved["config"]["steps"] == 20
    assert saved["final_loss"] < saved["initial_loss"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"k": 0}, "k"), ({"k": 6}, "k"), ({"temperature": 0.0}, "temperature"), ({"lr": -1}, "lr")],
)
def test_bad_settings_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        demo.train_scores(n=6, steps=1, **kwargs)


def test_gradkit_demo_topk_command(tmp_path, capsys):
    from gradkit.cli import main as gradkit_main

    out = str(tmp_path / "run")
    assert gradkit_main(["demo", "topk", "--steps", "10", "--batch", "2", "--out", out]) == 0
    assert "hard top-k equals the target" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        gradkit_main(["demo", "topk", "--k", "10", "--n", "10", "--out", f"{out}-bad"])
    assert exit_info.value.code == 2
    assert "k must be an integer with 0 < k < n = 10" in capsys.readouterr().err


def test_an_existing_json_is_kept_unless_overwrite(tmp_path, capsys):
    from gradkit.cli import main as gradkit_main

    path = tmp_path / "demo.json"
    path.write_text("{}")
    flags = ["demo", "topk", "--steps", "2", "--json", str(path), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        gradkit_main(flags)
    assert exit_info.value.code == 2
    assert "--json" in capsys.readouterr().err and path.read_text() == "{}"
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    assert gradkit_main([*flags, "--overwrite"]) == 0
    assert json.loads(path.read_text())["config"]["steps"] == 2
