"""The thin dispatcher: every command is wired, helps, and turns user errors into exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradkit import cli

COMMANDS = [
    ["bench", "topk"],
    ["bench", "align"],
    ["demo", "topk"],
    ["align"],
    ["train"],
]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("bench", "demo", "align", "train"):
        assert name in out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: gradkit " + " ".join(command) in capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_command_has_a_description_line(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    lines = capsys.readouterr().out.split("\n\n")
    description = next(block for block in lines[1:] if block.strip())
    assert not description.lstrip().startswith(("positional", "options"))
    assert len(description.strip()) > 20


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nonsense"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_user_error_is_a_clean_message_not_a_traceback(monkeypatch, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "topk"])

    def broken_run(_args):
        raise ValueError("k must lie in [0, n]")

    monkeypatch.setattr(args, "run", broken_run)
    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(parser, args))
    monkeypatch.delenv("GRADKIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "topk"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "gradkit demo: error: k must lie in [0, n]" in err
    assert "Traceback" not in err


class _FixedParser:
    """A parser stand-in that returns prepared arguments but keeps the real exit()."""

    def __init__(self, parser, args):
        self._parser, self._args = parser, args

    def parse_args(self, argv):
        return self._args

    def exit(self, status, message):
        self._parser.exit(status, message)


@pytest.mark.parametrize("module", ["gradkit", "gradkit.cli"])
def test_module_entry_point_runs(module):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage: " in done.stdout and "align" in done.stdout


def test_python_m_gradkit_usage_error_exits_2():
    done = subprocess.run(
        [sys.executable, "-m", "gradkit", "align", "--width", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--width" in done.stderr and "Traceback" not in done.stderr


def test_version(capsys):
    from gradkit import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradkit {__version__}"


def _run_with(monkeypatch, error):
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "topk"])

    def broken_run(_args):
        raise error

    monkeypatch.setattr(args, "run", broken_run)
    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(parser, args))
    monkeypatch.delenv("GRADKIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "topk"])
    return exit_info.value.code


def test_io_failure_and_interrupt_are_one_line_not_a_traceback(monkeypatch, capsys):
    error = OSError(28, "No space left on device", "runs/x/alignment.json")
    assert _run_with(monkeypatch, error) == 1
    err = capsys.readouterr().err
    assert "runs/x/alignment.json: No space left on device" in err and "Traceback" not in err
    assert _run_with(monkeypatch, KeyboardInterrupt()) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a_file", "below_a_file"])
def test_unusable_output_paths_exit_2_naming_the_flag(tmp_path, capsys, where):
    afile = tmp_path / "f"
    afile.write_text("keep")
    target = afile if where == "a_file" else afile / "x.json"
    argv = ["bench", "topk", "--quick", "--no-peers", "--no-plot", "--out", str(target)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error: --out: " in capsys.readouterr().err
    json_argv = ["demo", "topk", "--steps", "1", "--json", str(afile / "x.json")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(json_argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "error: --json: " in captured.err and "is a file, not a folder" in captured.err
    assert "step" not in captured.out  # refused before the run, not after it
    assert afile.read_text() == "keep"


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", "topk", "--quick", "--no-peers", "--no-plot", "--threads", "1"]
    argv += ["--repeats", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    first = (out / "results.json").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == first
    assert cli.main([*argv, "--overwrite"]) == 0
