"""The ``gradkit`` command line: a thin dispatcher.

Each command's flags and work live next to the code they exercise; this file only wires
them together::

    gradkit bench topk [--json FILE]     speed of soft_topk and sparse_topk against baselines
    gradkit bench sparse                 sparse_topk alone over several τ, against peers
    gradkit bench align                  fast alignment matrix vs a naive loop
    gradkit demo topk                    learn scores so the soft top-k hits a target mask
    gradkit demo moe                     mixture-of-experts routing: four gatings compared
    gradkit align [sweep] ...            measure gradient alignment (one setting, or a grid)
    gradkit train ...                    local versus global training with layerwise targets
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> {subject -> module}; each module exposes add_arguments(parser) and run(args).
_BENCH = {
    "topk": "gradkit.topk.benchmark",
    "sparse": "gradkit.topk.bench_sparse",
    "align": "gradkit.align.benchmark",
}
_DEMO = {"topk": "gradkit.topk.demo", "moe": "gradkit.topk.demo_moe"}
_TOP = {"align": "gradkit.align.experiment_cli", "train": "gradkit.align.train_experiment"}


def _module(name: str):
    return importlib.import_module(name)


def _first_line(module) -> str:
    """A command's description line: the first line of its module docstring."""
    return (module.__doc__ or "").strip().splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradkit",
        description="Differentiable top-k and a gradient-alignment lab.",
    )
    from gradkit import __version__

    parser.add_argument("--version", action="version", version=f"gradkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, subjects, help_text in (
        ("bench", _BENCH, "measure speed against baselines in one process"),
        ("demo", _DEMO, "small runnable demonstrations"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        subject_parsers = command.add_subparsers(dest="subject", required=True, metavar="SUBJECT")
        for subject, module_name in subjects.items():
            module = _module(module_name)
            doc = _first_line(module)
            sub = subject_parsers.add_parser(subject, help=doc, description=doc)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)

    for name, module_name in _TOP.items():
        module = _module(module_name)
        sub = commands.add_parser(
            name,
            help=_first_line(module),
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradkit`` console script.

    Usage errors (bad flag values, unusable output paths: ``ValueError``/``TypeError`` naming
    the flag) exit with code 2, as argparse's own do; an I/O failure during the run exits
    with 1 and an interrupt with 130, each with one line instead of a traceback
    (``GRADKIT_DEBUG=1`` shows the traceback when hunting a bug).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"gradkit {args.command}"
    try:
        result = args.run(args)
    except (ValueError, TypeError) as error:
        _reraise_when_debugging()
        parser.exit(2, f"{prefix}: error: {error}\n")
    except OSError as error:
        _reraise_when_debugging()
        parser.exit(1, f"{prefix}: error: {_describe_os_error(error)}\n")
    except KeyboardInterrupt:
        _reraise_when_debugging()
        parser.exit(130, f"{prefix}: interrupted\n")
    return int(result or 0)


def _reraise_when_debugging() -> None:
    if os.environ.get("GRADKIT_DEBUG"):
        raise  # the exception being handled


def _describe_os_error(error: OSError) -> str:
    """``cannot write runs/x.json: No space left on device`` rather than errno tuples."""
    where = f" {error.filename}" if error.filename else ""
    return f"cannot access{where}: {error.strerror or error}"


if __name__ == "__main__":
    sys.exit(main())
