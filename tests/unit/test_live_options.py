"""Options of the live adapters (simulate, microscope, replay) are checked before a socket is
opened or a specimen drawn: a bad one is a usage error (exit 2), never a traceback; replay
says so and exits non-zero when it sent nothing, and a stopped --watch prints its summary."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoscout.cli.main import main
from nanoscout.clients.acquisition import publisher as publisher_module
from nanoscout.clients.acquisition.publisher import SendReport
from nanoscout.clients.acquisition.simulator import MAX_FRAME_BYTES, SimulatorOptions
from nanoscout.daemon.config import InputConfig
from nanoscout.wire.errors import ConfigError

# nothing listens here: a check that let a bad option through would fail on the connection
_NOWHERE = ["--frames-endpoint", "tcp://127.0.0.1:6698"]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2, argv
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return out.err


# ------------------------------------------------------------------------------- simulate

@pytest.mark.parametrize("bad", [
    ["--size", "0"], ["--size", "1"], ["--size", "-5"], ["--size", "100000"],
    ["--size", "20000"],  # 800 MB of uint16: more than the daemon's max_frame_bytes
    ["--width", "0"], ["--pixel-size", "0"], ["--pixel-size", "nan"], ["--diameter", "0"],
    ["--diameter", "inf"], ["--dose", "-1"], ["--dose", "nan"], ["--fields", "0"],
    ["--dwell", "0"], ["--rate", "-5"], ["--rate", "nan"], ["--frames", "-1"],
    ["--seed", "-1"], ["--drift", "nan", "0"], ["--support-grains", "0.95"],
    ["--appear", "-1"],
])
def test_simulate_refuses_bad_options(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["simulate", *_NOWHERE, "--frames", "1", *bad], capsys)
    assert bad[0] in err or "frame is" in err


def test_simulator_options_check_themselves() -> None:
    good = SimulatorOptions(endpoint="inproc://x", shape=(64, 64))
    assert good.shape == (64, 64)
    kws: list[dict[str, Any]] = [
        {"fields": 0}, {"dwell": 0}, {"rate_hz": -5.0}, {"rate_hz": float("nan")},
        {"frames": -1}, {"shape": (0, 64)}, {"shape": (70000, 8)}, {"pixel_size_nm": 0.0},
        {"median_diameter_nm": float("nan")}, {"dose_e_per_px": -1.0},
        {"drift_px_per_frame": (float("inf"), 0.0)}]
    for kw in kws:
        with pytest.raises(ConfigError):
            SimulatorOptions(endpoint="inproc://x", shape=kw.pop("shape", (64, 64)), **kw)


def test_simulator_frame_limit_is_the_daemons_default() -> None:
    assert InputConfig().max_frame_bytes == MAX_FRAME_BYTES


# ----------------------------------------------------------------------------- microscope

_MICROSCOPE = ["microscope", "--control", "tcp://127.0.0.1:6697", *_NOWHERE]


@pytest.mark.parametrize("bad", [
    ["--specimen-um", "0", "0"], ["--specimen-um", "nan", "5"], ["--specimen-um", "1e9", "1e9"],
    ["--specimen-um", "5000", "5000"],  # ~2e7 particles
    ["--specimen-um", "20", "20"],  # the default 24 targets do not fit
    ["--diameter", "-1"], ["--coverage", "2"], ["--speed", "0"], ["--speed", "nan"],
    ["--settle", "-1"], ["--large", "-3"], ["--wires", "-1"], ["--agglomerates", "-1"],
    ["--exposure", "-1"], ["--dose", "nan"], ["--seed", "-1"],
    ["--truth", "/nonexistent/dir/t.json"], ["--truth", "."],
])
def test_microscope_refuses_bad_options(bad: list[str], capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    err = _usage_error([*_MICROSCOPE, *bad], capsys)
    assert bad[0] in err


def test_microscope_keeps_an_existing_truth_file(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    truth = tmp_path / "truth.json"
    truth.write_text("mine")
    err = _usage_error([*_MICROSCOPE, "--truth", str(truth)], capsys)
    assert "--overwrite" in err
    assert truth.read_text() == "mine"


def test_microscope_replaces_an_earlier_runs_truth_without_being_asked(tmp_path: Path) -> None:
    """Re-running the README's ``microscope --truth truth.json`` replaces its own earlier
    truth; only a file it did not write needs ``--overwrite``."""
    import argparse

    from nanoscout.clients.microscope.command import add_arguments, check_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"config": {}, "n_particles": 3, "targets": [],
                                 "agglomerates_um": []}))
    check_options(parser.parse_args(["--truth", str(truth)]))  # an earlier run's: no error
    truth.write_text(json.dumps({"notes": "mine"}))
    with pytest.raises(ConfigError, match="not a truth file this command wrote"):
        check_options(parser.parse_args(["--truth", str(truth)]))
    check_options(parser.parse_args(["--truth", str(truth), "--overwrite"]))


# --------------------------------------------------------------------------------- replay

class _FakePublisher:
    """Takes frames without a socket (the adapter's ``send`` / ``close``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.report = SendReport()

    def send(self, image: np.ndarray, **kwargs: Any) -> int:
        self.report.sent += 1
        return self.report.sent

    def close(self) -> SendReport:
        return self.report


@pytest.fixture
def fake_publisher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher_module, "FramePublisher", _FakePublisher)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
    return path


def test_replay_exits_1_when_nothing_was_sent(tmp_path: Path, fake_publisher: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nope.tif").write_bytes(b"")
    assert main(["replay", str(tmp_path / "nope.tif")]) == 1
    assert "nothing sent" in capsys.readouterr().err
    # one good file is enough: bad files are skipped, as documented
    assert main(["replay", str(_png(tmp_path / "good.png")), str(tmp_path / "nope.tif"),
                 "--pixel-size", "1"]) == 0
    assert "sent 1 frames; skipped 1 files" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["img.tif", "--watch", "."], ["--watch", "/nonexistent"]])
def test_replay_refuses_what_it_would_ignore(argv: list[str], fake_publisher: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", *argv]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("nanoscout replay: error: ")
    assert "watching" not in out.out


def test_replay_watch_stopped_prints_its_summary_and_exits_130(
        tmp_path: Path, fake_publisher: None, capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)
    done = threading.Event()

    def interrupt_once_watching() -> None:
        # the signal comes once the command's own handler is installed (or after 10 s in any
        # case, so that a command without one is stopped too)
        deadline = time.monotonic() + 10.0
        while not done.wait(0.01):
            if (signal.getsignal(signal.SIGINT) not in (before, signal.default_int_handler)
                    or time.monotonic() > deadline):
                os.kill(os.getpid(), signal.SIGINT)
                return

    t = threading.Thread(target=interrupt_once_watching)
    t.start()
    try:
        code = main(["replay", "--watch", str(tmp_path)])
    finally:
        done.set()
        t.join()
    assert code == 130
    assert "replay: sent 0 frames; skipped 0 files" in capsys.readouterr().out


# --------------------------------------------------------------------- demo and stage search

@pytest.mark.parametrize("bad", [
    ["demo", "--size", "0"], ["demo", "--rate", "nan"], ["demo", "--rate", "-1"],
    ["demo", "--duration", "-5"], ["demo", "--duration", "inf"],
    ["search", "--size", "0"], ["search", "--pixel-size", "nan"],
    ["search", "--survey-pixel-size", "0"], ["search", "--overlap", "-1"],
    ["search", "--result-timeout", "-1"], ["search", "--budget-frames", "0"],
    ["search", "--budget-s", "nan"], ["search", "--min-separation", "inf"],
])
def test_demo_and_search_refuse_bad_options_before_starting(
        bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo ran 0 frames for a --size 0 or --rate nan and said nothing; the search asked
    the microscope first (30 s without one) and checked its options afterwards."""
    extra = ["--out", str(tmp_path / "found"), "--target-rule", "large",
             "--control", "tcp://127.0.0.1:9"] if bad[0] == "search" else []
    t0 = time.monotonic()
    err = _usage_error([*bad, *extra], capsys)
    assert bad[1] in err and time.monotonic() - t0 < 10
    assert not (tmp_path / "found").exists()
