"""The ``gradkit`` command line: a thin dispatcher.

Each command's flags and work live next to the code they exercise; this file only wires
them together::

    gradkit bench topk [--json FILE]     speed of soft top-k against baselines
    gradkit bench sparse                 speed of sparse_topk against a sigmoid pass and peers
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
_TOP = {"align": "gradkit.align.experiment", "train": "gradkit.align.train_experiment"}


def _module(name: str):
    return importlib.import_module(name)


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
            sub = subject_parsers.add_parser(
                subject, help=module.__doc__.strip().splitlines()[0] if module.__doc__ else None
            )
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)

    for name, module_name in _TOP.items():
        module = _module(module_name)
        doc = module.__doc__.strip().splitlines()[0] if module.__doc__ else None
        sub = commands.add_parser(
            name,
            help=doc,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, TypeError) as error:
        # User-facing errors (bad flag values) print cleanly instead of a traceback;
        # GRADKIT_DEBUG=1 shows the traceback when hunting a bug.
        if os.environ.get("GRADKIT_DEBUG"):
            raise
        parser.exit(2, f"gradkit {args.command}: error: {error}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
