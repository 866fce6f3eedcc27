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
