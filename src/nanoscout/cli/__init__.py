"""The ``nanoscout`` command line: the composition root, the one place that may start the
daemon, run the pipeline offline and call training code."""

from nanoscout.cli.main import main

__all__ = ["main"]
