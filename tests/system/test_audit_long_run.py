"""A daemon that runs for months: what many sources, gaps and refusals leave behind is bounded.

Found by a long-run audit (many source names, live links that drop frames): a source whose
frames were all refused, with a gap in its numbering, got a ``transport_gaps_total`` series
that nothing ever removed (2000 such names: 4000 more /metrics lines, 18.7 → 280 kB), and each
gap was a WARNING line (one live source outrunning its link: 10,602 lines in 20 s).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.subscriber import Subscriber
from nanoscout.wire.protocol import encode_frame, frame_header
from tests.system.conftest import start_daemon

pytestmark = pytest.mark.system


def _series(text: str, name: str) -> dict[str, float]:
    """source label → value of each ``name{source="..."}`` sample in exposition text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + '{source="'):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


def test_refused_sources_add_no_series_and_gaps_are_logged_once_a_minute(tmp_path: Path
                                                                         ) -> None:
    """200 names each send two frames with a dead (NaN) pixel, as a gain-corrected camera
    does, numbered 0 and 2 (frame 1 lost on the way); one source sends good frames with gaps
    too. Every gap is counted in health; only the source whose frames were taken has a
    Prometheus series (with its gaps), and the 202 gaps make one log line."""
    log = tmp_path / "daemon.log"
    d = start_daemon(tmp_path, "--policy", "lossless", config="[input]\nmax_sources = 4\n",
                     log=log)
    bad = np.full((64, 64), 100.0, np.float32)
    bad[3, 3] = np.nan
    good = np.random.default_rng(3).integers(0, 4000, (64, 64)).astype(np.uint16)
    names = [f"scan{k:04d}" for k in range(200)]
    try:
        with Subscriber(d.output, topics=("health",)) as sub:
            sub.wait_ready()
            with FramePublisher(d.input, mode="push", source="x") as pub:
                for name in names:
                    for seq in (0, 2):
                        h = frame_header(bad, source=name, seq=seq, t_acq_ns=time.time_ns(),
                                         pixel_size_nm=0.5)
                        pub.send_raw([bytes(p) for p in encode_frame(h, bad)])
                for seq in (0, 2, 4):
                    h = frame_header(good, source="cam", seq=seq, t_acq_ns=time.time_ns(),
                                     pixel_size_nm=0.5)
                    pub.send_raw([bytes(p) for p in encode_frame(h, good)])
            health = None
            for msg in sub.messages(timeout=120):
                h = msg.header
                if h.frames_processed == 3 and h.rejected.get("nonfinite", 0) == 400:
                    health = h
                    break
        assert health is not None, "the frames were not all answered"
        assert health.transport_gaps == 202  # every gap counted, refused frames' too
        text = d.scrape()
        assert _series(text, "nanoscout_transport_gaps_total") == {"cam": 2.0}
        assert set(_series(text, "nanoscout_frames_received_total")) == {"cam"}
        assert d.stop(signal.SIGTERM) == 0
    finally:
        d.stop()
    gap_lines = [line for line in log.read_text(encoding="utf-8").splitlines()
                 if "lost in transport" in line]
    assert len(gap_lines) == 1, gap_lines[:5]
    assert "scan0000: 1 frame(s) lost in transport before seq 2" in gap_lines[0]
    assert "at most one line every 60 s" in gap_lines[0]
