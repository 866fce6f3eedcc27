"""`gradkit align sweep` as tasks: executors agree, --resume skips, Ctrl-C keeps finished cells."""

from __future__ import annotations

import json

import pytest
from support import gradkit

from gradkit import _resources
from gradkit.align import experiment, experiment_sweep

# Two cells (width 3 and 4) of a tiny net: seconds per run, yet a real grid.
GRID = [
    "align", "sweep", "--depth", "3", "--width", "3,4", "--batch", "4", "--seeds", "2",
    "--no-plots",
]  # fmt: skip


def _rows(out) -> list[dict]:
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    assert gradkit([*GRID, "--out", str(out)]) == 0
    return out


def test_every_cell_is_written_as_its_own_file(serial):
    cells = sorted((serial / "cells").glob("*.json"))
    assert len(cells) == 2
    for path in cells:
        data = json.loads(path.read_text())
        assert path.stem == experiment_sweep.cell_key(data["task"])
        assert data["result"]["setting"]["width"] == data["task"]["setting"]["width"]
    assert not (serial / "INCOMPLETE.json").exists()


def test_local_processes_give_the_same_numbers_as_a_serial_run(serial, tmp_path):
    assert gradkit([*GRID, "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert _rows(tmp_path) == _rows(serial)


def test_ray_gives_the_same_numbers_as_a_serial_run(serial, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional extra gradkit[ray]; not installed")
    assert gradkit([*GRID, "--executor", "ray", "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert _rows(tmp_path) == _rows(serial)


def test_resume_runs_only_the_missing_cells(serial, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    assert gradkit([*GRID, "--out", str(out)]) == 0
    first = sorted((out / "cells").glob("*.json"))[0]
    first.unlink()
    (out / "sweep.json").unlink()
    calls = []
    real = experiment.measure_cell
    monkeypatch.setattr(experiment, "measure_cell", lambda task: calls.append(task) or real(task))
    assert gradkit([*GRID, "--resume", "--out", str(out)]) == 0
    assert len(calls) == 1 and first.exists()
    assert _rows(out) == _rows(serial)


def test_ctrl_c_keeps_finished_cells_and_says_how_to_resume(serial, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    real = experiment.measure_cell
    calls = []

    def interrupted_on_second(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(experiment, "measure_cell", interrupted_on_second)
    with pytest.raises(SystemExit) as exit_info:
        gradkit([*GRID, "--out", str(out)])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "1 of 2 cells finished" in err and "--resume" in err and str(out) in err
    assert len(list((out / "cells").glob("*.json"))) == 1
    marker = json.loads((out / "INCOMPLETE.json").read_text())
    assert marker["status"] == "interrupted"
    monkeypatch.setattr(experiment, "measure_cell", real)
    assert gradkit([*GRID, "--resume", "--out", str(out)]) == 0
    assert not (out / "INCOMPLETE.json").exists()
    assert _rows(out) == _rows(serial)


def test_a_foreign_or_torn_cell_file_is_run_again(serial, tmp_path):
    tasks = [json.loads(p.read_text())["task"] for p in sorted((serial / "cells").glob("*.json"))]
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / f"{experiment_sweep.cell_key(tasks[0])}.json").write_text('{"task": ')
    other = dict(tasks[1], seeds=[7])
    (cells / f"{experiment_sweep.cell_key(tasks[1])}.json").write_text(
        json.dumps({"task": other, "result": {}})
    )
    assert experiment_sweep.load_finished(cells, tasks) == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resume"], "--resume needs --out"),
        (["--jobs", "0"], "--jobs"),
        (["--resume", "--overwrite", "--out", "never-made"], "pick one"),
        (["--address", "localhost:6379"], "--address is for --executor ray"),
    ],
)
def test_bad_sweep_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradkit([*GRID, *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--jobs", "2"], ["--resume"], ["--executor", "ray"]])
def test_sweep_only_flags_are_refused_for_a_single_run(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gradkit(["align", "--depth", "3", "--width", "3", *flag, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert f"{flag[0]} is for `gradkit align sweep`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_sweep_cell_too_big_for_memory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_resources, "available_memory_bytes", lambda: 8 * 2**30)
    with pytest.raises(SystemExit) as exit_info:
        gradkit([*GRID, "--width", "3,100000", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--width 100000" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
