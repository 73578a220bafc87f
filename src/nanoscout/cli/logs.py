"""Start-up logging of the command line: one concise engine line instead of one log line per
model and backend considered.

Engine selection logs, per model, each backend it skipped (and why), the one it chose and how
it loaded the model: 16 lines for the four shipped models. Without ``-v`` those INFO records
are held back by :class:`EngineSummary` and :meth:`EngineSummary.line` sums them up in one line
(wrapped here)::

    engine: onnxruntime-cpu (2 threads) for detector, detector_stem, classifier, lens;
        not available: tensorrt, onnxruntime-cuda (-v says why)

Warnings and errors always pass.

Every record is one line: its text is written as :func:`~nanoscout.wire.codec.printable`
escapes, since log messages name files, paths and request fields that are anyone's text (a
file named ``x.tif\\n2026-... ERROR ...`` in a watched folder would otherwise forge a second
record, a ``\\r`` or a terminal escape overwrite or restyle one). A traceback that follows a
record keeps its lines (frames, the chain), but the text of each exception in it, its message
and notes (a reader's error names the file), is one :func:`printable` line, and its other
lines hold no control character either: ``bad.tif\\n<date> ERROR ...`` in an exception starts
no line at column 0. An exception group's members are written indented (``| ``), a line at a
time.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from pathlib import Path
from types import TracebackType

from nanoscout.wire.codec import printable

__all__ = ["EngineSummary", "PrintableFormatter", "setup_logging"]

_USING = re.compile(r"using (\S+)(?: \((\w+)\))? for (\S+)")
_SKIPPED = re.compile(r"auto engine selection: (\S+) skipped")
_THREADS = re.compile(r"\((\d+) intra-op threads")


class EngineSummary(logging.Filter):
    """Holds back the engines' INFO records and remembers what they said."""

    def __init__(self) -> None:
        super().__init__()
        self.backends: dict[str, str] = {}  # model file stem -> backend
        self.skipped: list[str] = []
        self.threads: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Remember what an engine INFO record says; return False to hold it back."""
        if not record.name.startswith("nanoscout.engines") or record.levelno > logging.INFO:
            return True
        msg = record.getMessage()
        if m := _USING.search(msg):
            # an INT8 sibling (detector.int8.onnx) is the detector; fp32 goes unsaid
            precision = "" if m.group(2) in (None, "fp32") else f" {m.group(2)}"
            model = Path(m.group(3)).stem.removesuffix(".int8")
            # an INT8 detector's FP32 model, loaded beside it to measure the working scale
            # (quantization.fp32_scale), does not make the detector an FP32 one
            if not precision and self.backends.get(model, "").endswith(" int8"):
                return False
            self.backends[model] = m.group(1) + precision
        elif (m := _SKIPPED.search(msg)) and m.group(1) not in self.skipped:
            self.skipped.append(m.group(1))
        if m := _THREADS.search(msg):
            self.threads = m.group(1)
        return False

    def line(self) -> str | None:
        """The one-line summary, or None when no engine was chosen yet."""
        if not self.backends:
            return None
        by_backend: dict[str, list[str]] = {}
        for model, backend in self.backends.items():
            by_backend.setdefault(backend, []).append(model)
        threads = f" ({self.threads} threads)" if self.threads else ""
        used = "; ".join(f"{b}{threads if 'cpu' in b else ''} for {', '.join(m)}"
                         for b, m in by_backend.items())
        skipped = [s for s in self.skipped if s not in by_backend]
        tail = f"; not available: {', '.join(skipped)} (-v says why)" if skipped else ""
        return f"engine: {used}{tail}"


#: what :meth:`logging.Formatter.formatException` is given (``sys.exc_info()``)
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | \
    tuple[None, None, None]


class PrintableFormatter(logging.Formatter):
    """A formatter whose record lines hold no control character (:func:`printable`), nor do
    the traceback and stack lines after a record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line (time, level, logger, message) as :func:`printable` text."""
        return printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        """The record as :meth:`logging.Formatter.format` writes it, its traceback made here:
        a traceback another handler formatted first (``record.exc_text``, raw) is not reused."""
        cached = record.exc_text
        if record.exc_info:
            record.exc_text = None
        elif cached:  # a record from elsewhere (a socket, a queue): its text only
            record.exc_text = _printable_lines(cached)
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(self, ei: _ExcInfo) -> str:
        """The traceback of ``ei`` with its lines kept, but each exception's text (message and
        notes, the part from outside: a file name) as one :func:`printable` line, and no
        control character in the frame lines."""
        exc = ei[1]
        if exc is None:
            return super().formatException(ei)
        te = traceback.TracebackException(type(exc), exc, ei[2], compact=True)
        own = _exception_texts(te)
        text = "".join(printable(chunk.removesuffix("\n")) + "\n" if chunk in own
                       else _printable_lines(chunk) for chunk in te.format())
        return text.removesuffix("\n")

    def formatStack(self, stack_info: str) -> str:
        """``stack_info`` (``stack_info=True``) with no control character in its lines."""
        return _printable_lines(super().formatStack(stack_info))


def _printable_lines(text: str) -> str:
    """``text`` with its newlines kept and every line between them as :func:`printable` text
    (a carriage return, an escape, any other line break escaped)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _exception_texts(te: traceback.TracebackException) -> set[str]:
    """What :meth:`~traceback.TracebackException.format` writes for the exceptions' own text
    (``Type: message``, each note) of ``te`` and every exception chained to it. Their notes
    are made :func:`printable` here, in ``te``: the traceback module splits a note into lines
    before anything else sees it."""
    out: set[str] = set()
    todo, seen = [te], set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t.__notes__, list | tuple):
            t.__notes__ = [printable(n) if isinstance(n, str) else n for n in t.__notes__]
        out.update(t.format_exception_only())
        todo += [c for c in (t.__cause__, t.__context__, *(t.exceptions or ())) if c is not None]
    return out


def setup_logging(verbose: bool) -> EngineSummary:
    """Log INFO (DEBUG with ``verbose``) to stderr; without ``verbose`` the engines' start-up
    records go to the returned :class:`EngineSummary` instead."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    summary = EngineSummary()
    if not verbose:
        handler.addFilter(summary)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_nanoscout", False):
            root.removeHandler(h)
    handler._nanoscout = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return summary
