"""``nanoscout tail``: a live table of what the daemon publishes, in the terminal.

One row per source: frames/s, latency (acquisition → result) p50/p99, particles per frame,
D10/D50/D90 of ECD (window), number density, dropped/missed frames, and the latest
field-of-view class with its probability and novelty score; then the newest alerts.
On a terminal the table is drawn by ``rich`` (:func:`view`) as wide as the terminal, redrawn
in place once per second (columns shrink or fold on a narrow one, the field-of-view and alert
texts use whatever width is left); into a pipe or file it prints plain lines (:func:`render`),
one per source per second.

Text from the wire (class labels, alert explanations, engine names, reasons) is shown as it
is, never read as ``rich`` markup (a label ``Pt [/dense]`` ended the tail on a terminal, and
``Au [dense] film`` lost its word), and with control characters as their escapes
(:func:`~nanoscout.wire.codec.printable`: an ESC sequence in a label cannot clear or retitle
the operator's terminal).

The table keeps the :data:`MAX_SOURCES` most recently seen sources (a publisher that names
ever new sources must not grow it without bound; the others are counted as forgotten). A
message the table cannot show is left out and counted, as are the messages that could not be
decoded: one bad message never ends the tail. A ``det`` whose times give no latency (done
before its frame arrived: :attr:`~nanoscout.wire.protocol.DetHeader.latency_ms` None) is left
out of the latency percentiles and counted on a line of its own (its -10^12 ms was shown).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.codec import printable
from nanoscout.wire.protocol import AlertHeader, ClassHeader, DetHeader, HealthHeader, StatsHeader
from nanoscout.wire.transport import ClientKeys

__all__ = ["MAX_SOURCES", "SourceView", "TailState", "render", "run_tail", "view"]

log = logging.getLogger("nanoscout.tail")

#: sources the table shows: the most recently seen ones
MAX_SOURCES = 64


@dataclass
class SourceView:
    """Rolling view of one source's results."""

    t_done: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    #: frames whose det gave no latency (the daemon's times disagree), left out of latency_ms
    latency_unknown: int = 0
    counts: deque[int] = field(default_factory=lambda: deque(maxlen=50))
    frames: int = 0
    units: str = "nm"
    stats: StatsHeader | None = None
    klass: ClassHeader | None = None
    last_seq: int = -1

    def fps(self, now: float) -> float:
        """Frames per second over the last 5 s before ``now`` (s, ``time.monotonic``)."""
        recent = [t for t in self.t_done if now - t <= 5.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)


@dataclass
class TailState:
    """Everything the table shows, updated message by message."""

    #: the :data:`MAX_SOURCES` most recently seen sources, least recent first
    sources: OrderedDict[str, SourceView] = field(default_factory=OrderedDict)
    alerts: deque[AlertHeader] = field(default_factory=lambda: deque(maxlen=5))
    n_alerts: int = 0
    health: HealthHeader | None = None
    #: sources forgotten to keep :data:`MAX_SOURCES`
    sources_forgotten: int = 0
    #: messages left out because the table could not show them, and the last one's reason
    unshown: int = 0
    last_unshown: str | None = None

    def update(self, msg_header: object, now: float) -> None:
        """Fold one message header into the view (``now``: monotonic s). A message the table
        cannot show changes nothing and is counted in :attr:`unshown` (never raised)."""
        try:
            self._fold(msg_header, now)
        except Exception as exc:  # one message must never end the tail
            self.unshown += 1
            self.last_unshown = f"{type(msg_header).__name__}: {exc!r:.200}"
            if self.unshown <= 20:
                log.warning("a message the table cannot show was left out: %s",
                            self.last_unshown)

    def _source(self, name: str) -> SourceView:
        v = self.sources.get(name)
        if v is None:
            v = self.sources[name] = SourceView()
            if len(self.sources) > MAX_SOURCES:
                self.sources.popitem(last=False)
                self.sources_forgotten += 1
        self.sources.move_to_end(name)
        return v

    def _fold(self, msg_header: object, now: float) -> None:
        # each message is formatted as the table will show it before it changes the state:
        # what cannot be shown is refused here, never at every redraw
        if isinstance(msg_header, DetHeader):
            latency = msg_header.latency_ms
            _fmt(latency)
            _fmt(float(msg_header.n))
            v = self._source(msg_header.source)
            v.t_done.append(now)
            if latency is None:
                v.latency_unknown += 1
            else:
                v.latency_ms.append(latency)
            v.counts.append(msg_header.n)
            v.frames += 1
            v.units = msg_header.units
            v.last_seq = msg_header.seq
        elif isinstance(msg_header, StatsHeader):
            _stats_cells(msg_header)
            self._source(msg_header.source).stats = msg_header
        elif isinstance(msg_header, ClassHeader):
            _field_of_view(msg_header)
            self._source(msg_header.source).klass = msg_header
        elif isinstance(msg_header, AlertHeader):
            _alert_text(msg_header)
            self.alerts.appendleft(msg_header)
            self.n_alerts += 1
        elif isinstance(msg_header, HealthHeader):
            _status(msg_header)
            self.health = msg_header


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _field_of_view(c: ClassHeader | None) -> str:
    if c is None or not c.labels or not c.probabilities:
        return "-"
    novelty = "" if c.novelty is None else f", novelty {c.novelty:.2f}"
    return f"{printable(c.labels[0])} ({c.probabilities[0]:.2f}{novelty})"


def _stats_cells(stats: StatsHeader | None) -> tuple[str, str, str, str]:
    """D10, D50, D90 of the window's ECD and its number density (per µm²), formatted."""
    win: Any = stats.window if stats else {}
    ecd = win.get("ecd") or {}
    return (_fmt(ecd.get("d10")), _fmt(ecd.get("d50")), _fmt(ecd.get("d90")),
            _fmt(win.get("number_density_per_um2"), ".0f"))


def _alert_text(a: AlertHeader) -> str:
    stage = f" @ ({a.stage.x_um:.1f}, {a.stage.y_um:.1f}) µm" if a.stage else ""
    return f"  [{a.severity}] {a.source}#{a.seq}{stage}: {printable(a.explanation)}"


def _status(h: HealthHeader) -> str:
    dropped = ", ".join(f"{printable(k)} {v}" for k, v in h.frames_dropped.items()) or "none"
    rejected = sum(h.rejected.values())
    engine = printable(h.engines.get("detector", "?"))
    return (f"daemon: {h.policy}, engine {engine}, up {h.uptime_s:.0f} s, "
            f"{h.frames_processed}/{h.frames_received} frames, dropped: {dropped}, "
            f"rejected {rejected}")


def _refused(state: TailState, sub: Subscriber) -> str | None:
    """The line on messages this tail could not decode or show (None: there were none)."""
    if not (sub.rejected or state.unshown or state.sources_forgotten):
        return None
    last = sub.last_rejection if state.last_unshown is None else state.last_unshown
    return (f"messages this tail refused: {sub.rejected} undecodable, {state.unshown} not "
            f"shown; sources forgotten: {state.sources_forgotten} (at most {MAX_SOURCES} shown)"
            + ("" if last is None else f"; last: {printable(last):.160}"))


def _unknown_latency(state: TailState) -> str | None:
    """The line naming the sources with frames of unknown latency (None: there were none)."""
    counts = [f"{name} {v.latency_unknown}" for name, v in sorted(state.sources.items())
              if v.latency_unknown]
    if not counts:
        return None
    return ("latency unknown (result stamped before its frame arrived), frames: "
            + ", ".join(counts))


def render(state: TailState, sub: Subscriber, now: float) -> list[str]:
    """The table as lines of text."""
    lines = []
    h = state.health
    if not sub.connected():
        lines.append(f"daemon at {sub.endpoint}: UNREACHABLE (no message for > 3 s)")
    elif h is not None:
        lines.append(_status(h))
    lines.append(
        f"{'source':<10} {'fps':>5} {'lat p50':>8} {'p99':>7} {'part/fr':>8} "
        f"{'D10':>7} {'D50':>7} {'D90':>7} {'unit':>4} {'dens/µm²':>9} {'missed':>6}  "
        "field of view (p, novelty)"
    )
    for name, v in sorted(state.sources.items()):
        lat = np.asarray(v.latency_ms)
        d10, d50, d90, density = _stats_cells(v.stats)
        lines.append(
            f"{name:<10} {v.fps(now):>5.1f} {_fmt(np.percentile(lat, 50) if lat.size else None):>8} "
            f"{_fmt(np.percentile(lat, 99) if lat.size else None):>7} "
            f"{_fmt(float(np.mean(v.counts)) if v.counts else None):>8} "
            f"{d10:>7} {d50:>7} {d90:>7} "
            f"{v.units:>4} {density:>9} "
            f"{sub.missed.get(name, 0):>6}  {_field_of_view(v.klass)}"
        )
    refused = _refused(state, sub)
    if refused is not None:
        lines.append(refused)
    unknown = _unknown_latency(state)
    if unknown is not None:
        lines.append(unknown)
    lines.append(f"alerts: {state.n_alerts}")
    lines.extend(_alert_text(a) for a in state.alerts)
    return lines


def view(state: TailState, sub: Subscriber, now: float) -> Any:
    """The table as a rich renderable (status line, one row per source, newest alerts) that
    fills the console's width."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    status = render(state, sub, now)[0] if (state.health or not sub.connected()) else ""
    style = "bold red" if not sub.connected() else "dim"
    t = Table(expand=True, box=None, pad_edge=False, header_style="bold")
    for name, justify in (("source", "left"), ("fps", "right"), ("lat p50 ms", "right"),
                          ("p99", "right"), ("part/fr", "right"), ("D10", "right"),
                          ("D50", "right"), ("D90", "right"), ("unit", "right"),
                          ("dens/µm²", "right"), ("missed", "right")):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    t.add_column("field of view (p, novelty)", ratio=1, overflow="fold")
    for name, v in sorted(state.sources.items()):
        lat = np.asarray(v.latency_ms)
        d10, d50, d90, density = _stats_cells(v.stats)
        cells = (
            name, f"{v.fps(now):.1f}", _fmt(np.percentile(lat, 50) if lat.size else None),
            _fmt(np.percentile(lat, 99) if lat.size else None),
            _fmt(float(np.mean(v.counts)) if v.counts else None), d10, d50, d90, v.units,
            density, str(sub.missed.get(name, 0)), _field_of_view(v.klass))
        # Text, not str: a str cell is rich markup, and a class label is the daemon's text
        t.add_row(*(Text(c) for c in cells))
    refused = _refused(state, sub)
    alerts = [Text(line, style="yellow", overflow="fold")
              for line in (refused, _unknown_latency(state)) if line is not None]
    alerts.append(Text(f"alerts: {state.n_alerts}", style="bold"))
    for a in state.alerts:
        colour = {"critical": "red", "warning": "yellow"}.get(a.severity, "")
        alerts.append(Text(_alert_text(a), style=colour, overflow="fold"))
    return Group(Text(status, style=style), t, *alerts)


def run_tail(
    endpoint: str,
    *,
    duration: float | None = None,
    out: TextIO = sys.stdout,
    refresh_s: float = 1.0,
    subscriber: Subscriber | None = None,
    curve: ClientKeys | None = None,
) -> TailState:
    """Show the live table until ``duration`` s have passed (None = until interrupted)."""
    sub = subscriber or Subscriber(endpoint, curve=curve)
    state = TailState()
    live = None
    if out.isatty():
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(file=out), auto_refresh=False, screen=False,
                    redirect_stdout=False, redirect_stderr=False)
        live.start()
    t_end = None if duration is None else time.monotonic() + duration
    next_draw = time.monotonic() + refresh_s
    try:
        while t_end is None or time.monotonic() < t_end:
            msg = sub.recv(timeout=0.1)
            now = time.monotonic()
            if msg is not None:
                state.update(msg.header, now)
            if now >= next_draw:
                if live is not None:
                    live.update(view(state, sub, now), refresh=True)
                else:
                    out.write("\n".join(render(state, sub, now)) + "\n\n")
                    out.flush()
                next_draw = now + refresh_s
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
        if subscriber is None:
            sub.close()
    return state
