"""Accuracy benchmark: model and classical baseline on synthetic and real data.

::

    python -m benchmarks.accuracy [extra nanoscout.training.evaluate options, e.g. --max-images 10]

runs ``nanoscout.training.evaluate --sets all`` and writes ``benchmarks/results/accuracy.json``.
"""

from __future__ import annotations

import sys

from nanoscout.training.evaluate import main as evaluate_main

RESULT = "benchmarks/results/accuracy.json"


def main(argv: list[str] | None = None) -> None:
    """Run the accuracy harness with defaults; extra arguments are passed through."""
    extra = list(sys.argv[1:] if argv is None else argv)
    evaluate_main(["--sets", "all", "--out", RESULT, *extra])


if __name__ == "__main__":
    main()
