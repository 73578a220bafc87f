"""Progress bars for long jobs (measure, report, model evaluation, training), drawn by ``rich``.

>>> for step in track(range(3), "training"):       # a loop, counted
...     pass
>>> with progress("measuring", total=2) as bar:
...     for f in ("a.tif", "b.tif"):
...         bar.log(f"{f}: 12 particles")             # printed above the bar
...         bar.advance()
a.tif: 12 particles
b.tif: 12 particles

The bar goes to stderr and only when stderr is a terminal (or ``enabled=True``); in a pipe, a
log file or a test it draws nothing and :meth:`Bar.log` prints plain lines, so output stays
greppable.

Lines and notes often name files (anyone's text): both are shown as
:func:`~nanoscout.wire.codec.printable` escapes (a newline, carriage return or terminal escape
in a name cannot forge, overwrite or restyle a line) and never as rich markup (a name such as
``[link=URL]x.tif`` is shown as it is).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from nanoscout.wire.codec import printable

__all__ = ["Bar", "progress", "track"]

T = TypeVar("T")


class Bar:
    """One running bar: :meth:`advance` it, :meth:`log` lines above it."""

    def __init__(self, progress: Any | None, task: Any | None, out: TextIO) -> None:
        self._progress = progress
        self._task = task
        self._out = out

    def advance(self, steps: float = 1, note: str | None = None) -> None:
        """Move the bar ``steps`` forward; ``note`` replaces its description's detail (shown
        as :func:`~nanoscout.wire.codec.printable` text, never as markup)."""
        if self._progress is not None:
            kw: dict[str, Any] = {"advance": steps}
            if note is not None:
                kw["detail"] = printable(note)
            self._progress.update(self._task, **kw)

    def total(self, total: float | None) -> None:
        """Set (or change) the number of steps."""
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def log(self, message: str) -> None:
        """Print ``message`` as its own line (above the bar while one is drawn), as
        :func:`~nanoscout.wire.codec.printable` text."""
        message = printable(message)
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self._out, flush=True)


@contextmanager
def progress(description: str, total: float | None = None, *, enabled: bool | None = None,
             out: TextIO | None = None) -> Iterator[Bar]:
    """A rich progress bar (spinner, bar, n/total, elapsed, remaining) for one job.

    ``enabled``: None draws only when stderr is a terminal. ``out``: where :meth:`Bar.log`
    prints without a bar (default stdout).
    """
    out = out or sys.stdout
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Bar(None, None, out)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[detail]}", style="dim", markup=False))
    with Progress(*columns, console=console, transient=False) as p:
        task = p.add_task(description, total=total, detail="")
        yield Bar(p, task, out)


def track(iterable: Iterable[T], description: str, total: float | None = None, *,
          enabled: bool | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while a :func:`progress` bar counts the items (``total``:
    ``len(iterable)`` when it has one, else a spinner and a count)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(description, total=total, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.advance()
