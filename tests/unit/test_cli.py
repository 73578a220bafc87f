"""The ``nanoscout`` command line (typer + rich): --version, defaults and units in every help,
one meaning per flag name, the old spellings as hidden aliases, pass-through to training
``main(argv)``, the one-line engine summary, and a tail as wide as the terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest
import typer

from nanoscout import __version__
from nanoscout.cli.logs import EngineSummary
from nanoscout.cli.main import app, check_args, main
from nanoscout.cli.signals import stop_event, stop_signals

COMMANDS = ["serve", "simulate", "replay", "tail", "record", "dashboard", "keys", "demo",
            "measure", "report", "microscope", "search"]


def _params(name: str) -> list:
    group = typer.main.get_command(app)
    cmd = group.get_command(typer.Context(group), name)  # type: ignore[attr-defined]
    return [p for p in cmd.params if not getattr(p, "hidden", False)]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nanoscout {__version__}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_a_shown_default(name: str) -> None:
    for p in _params(name):
        if p.param_type_name == "argument" or p.name in ("help",):
            continue
        assert p.help, f"{name} --{p.name} has no help"
        required = getattr(p, "required", False)
        is_flag = getattr(p, "is_flag", False) and not getattr(p, "secondary_opts", [])
        if not (required or is_flag):
            assert p.show_default not in (False, None), f"{name} --{p.name} hides its default"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_units(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert "[default:" in text or name == "keys"
    for p in _params(name):
        h = (p.help or "").lower()
        # every number a user types says its unit (or is a count / a port / a seed)
        if p.type_descriptor.annotation is float:
            assert re.search(r"nm|µm|px|hz|\bs\b|seconds|e/|fraction|/s|frames|electrons|"
                             r"ratio|per px|times|threshold", h), f"{name} --{p.name}: {h}"


def test_one_meaning_per_flag_name() -> None:
    meaning = {"frames_endpoint": "frame", "results": "result", "query": "query"}
    for name in COMMANDS:
        for p in _params(name):
            if p.name in meaning:
                assert meaning[p.name] in (p.help or "").lower(), (name, p.name, p.help)
    # --connect is no longer shown anywhere, but still accepted where it meant something
    for name in COMMANDS:
        assert all("--connect" not in p.opts for p in _params(name))
    check_args(["simulate", "--connect", "tcp://127.0.0.1:1", "--frames", "1"])
    check_args(["record", "--connect", "tcp://127.0.0.1:1", "--out", "r.parquet"])
    check_args(["dashboard", "--connect", "tcp://a:1", "--connect", "tcp://b:2"])
    check_args(["serve", "--input", "tcp://127.0.0.1:0", "--output", "tcp://127.0.0.1:0"])
    check_args(["measure", "a.tif", "--out", "r.csv", "--masks", "m/"])
    check_args(["-v", "models", "train", "--anything", "goes", "through"])
    with pytest.raises(typer.TyperException):
        check_args(["simulate", "--no-such-flag"])
    with pytest.raises(typer.TyperException):
        check_args(["simulate", "--mode", "carrier-pigeon"])


def test_models_pass_argv_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import nanoscout.training.evaluate_lens as target

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    monkeypatch.setattr(target, "main", fake_main)
    assert main(["models", "eval-lens", "--n", "5", "--help-me", "x"]) == 3
    assert seen == [["--n", "5", "--help-me", "x"]]


def test_an_actions_refusal_is_printed_not_swallowed(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A training module refuses with ``SystemExit("why")``: the console script says why."""
    import nanoscout.training.evaluate_lens as target

    def refuse(argv: list[str]) -> int:
        raise SystemExit(f"--frames {argv[1]}: no such folder")

    monkeypatch.setattr(target, "main", refuse)
    assert main(["models", "eval-lens", "--frames", "nowhere"]) == 1
    assert capsys.readouterr().err.strip() == "--frames nowhere: no such folder"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err
    assert "nanoscout report: error:" in err and "missing.parquet" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["save-frame", "sim", "--frames", "0", "--query", "tcp://127.0.0.1:9"],
    ["models", "swap", "detector.onnx", "--sha256", "XYZ", "--query", "tcp://127.0.0.1:9"],
    ["dashboard", "--port", "70000"],
    ["health", "--timeout=-1"], ["health", "--timeout", "nan"], ["health", "--timeout", "inf"],
])
def test_impossible_options_are_usage_errors_not_tracebacks(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each of these once ended in a traceback (ValidationError, OverflowError, ValueError)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Invalid value" in err and "Traceback" not in err, err


def test_engine_selection_is_one_line() -> None:
    s = EngineSummary()
    log = logging.getLogger("nanoscout.engines")
    recs = [
        "loaded /w/detector.onnx with onnxruntime-cpu (2 intra-op threads, providers CPU)",
        "auto engine selection: tensorrt skipped: TensorRT is not installed",
        "auto engine selection: onnxruntime-cuda skipped: no CUDAExecutionProvider",
        "auto engine selection: using onnxruntime-cpu for /w/detector.onnx",
        "auto engine selection: tensorrt skipped: TensorRT is not installed",
        "auto engine selection: using onnxruntime-cpu for /w/lens.onnx",
    ]
    kept = [s.filter(log.makeRecord(log.name, logging.INFO, "", 0, m, (), None)) for m in recs]
    assert not any(kept)  # all held back
    assert s.filter(log.makeRecord(log.name, logging.WARNING, "", 0, "auto: x failed", (), None))
    assert s.line() == ("engine: onnxruntime-cpu (2 threads) for detector, lens; not available: "
                        "tensorrt, onnxruntime-cuda (-v says why)")


def test_engine_line_names_an_int8_detector_whose_fp32_model_measures_its_scale() -> None:
    """The daemon loads an INT8 detector's FP32 model beside it to measure the working scale
    (quantization.fp32_scale): the detector still runs in INT8, and the line says so (it
    said FP32, the last engine loaded for the name)."""
    s = EngineSummary()
    log = logging.getLogger("nanoscout.engines")
    for m in ("auto engine selection: using onnxruntime-cpu (int8) for /w/detector.int8.onnx",
              "auto engine selection: using onnxruntime-cpu (fp32) for /w/detector.onnx",
              "auto engine selection: using onnxruntime-cpu (fp32) for /w/lens.onnx"):
        assert not s.filter(log.makeRecord(log.name, logging.INFO, "", 0, m, (), None))
    assert s.line() == ("engine: onnxruntime-cpu int8 for detector; onnxruntime-cpu for lens")


@pytest.mark.parametrize("width", [90, 160])
def test_tail_uses_the_terminal_width(width: int) -> None:
    from rich.console import Console

    from nanoscout.clients.tail import TailState, view
    from nanoscout.wire.protocol import AlertHeader, DetHeader

    class Sub:
        endpoint = "tcp://x:1"
        missed: dict[str, int] = {}
        rejected = 0
        last_rejection = None

        def connected(self) -> bool:
            return True

    st = TailState()
    st.update(DetHeader(source="cam", seq=1, t_acq_ns=1, t_recv_ns=2, t_done_ns=3_000_000,
                        stage_ms={}, pixel_size_nm=0.5, units="nm", n=4, engine="e"), 1.0)
    st.update(AlertHeader(source="cam", seq=1, t_acq_ns=1, rule="r", kind="particle",
                          severity="warning", value=1, threshold=0,
                          explanation="long explanation " * 20), 1.0)
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(view(st, Sub(), 1.0))  # type: ignore[arg-type]
    lines = console.export_text().splitlines()
    assert max(len(ln) for ln in lines) <= width
    header = next(ln for ln in lines if ln.startswith("source"))
    assert len(header) == width  # the table spans the terminal
    assert sum("long explanation" in ln for ln in lines) >= 2  # folded, not cut


def test_stop_signals_interrupt_and_put_the_old_handlers_back() -> None:
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt), stop_signals():
                os.kill(os.getpid(), sig)
                time.sleep(5)  # allowed: only bounds a failure; the handler raises as os.kill returns
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGTERM, before_term)


def test_stop_event_is_set_by_the_first_signal_and_the_second_interrupts() -> None:
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_event() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)  # set, nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # allowed: only bounds a failure; the handler raises as os.kill returns
    assert signal.getsignal(signal.SIGINT) == before_int
    assert signal.getsignal(signal.SIGTERM) == before_term


class _TailSub:
    endpoint = "tcp://x:1"
    missed: dict[str, int] = {}
    rejected = 2
    last_rejection = "class header field probabilities: ..."

    def connected(self) -> bool:
        return True


def test_tail_leaves_out_and_counts_a_message_it_cannot_show() -> None:
    """A class message with labels but no probabilities (decode refuses it now) once ended
    ``nanoscout tail`` with an IndexError at its next redraw: a message the table cannot show
    changes nothing and is counted."""
    from nanoscout.clients.tail import TailState, render
    from nanoscout.wire.protocol import ClassHeader, DetHeader

    st = TailState()
    st.update(DetHeader(source="cam", seq=1, t_acq_ns=1, t_recv_ns=2, t_done_ns=3_000_000,
                        pixel_size_nm=0.5, units="nm", n=4, engine="e"), 1.0)
    st.update(ClassHeader(source="cam", seq=1, labels=["film"], probabilities=[0.75]), 1.0)
    # what decode refuses never gets here; what the table still cannot show is left out
    for probabilities in ([], ["high"]):
        st.update(ClassHeader.model_construct(  # no validation: what no decode lets through
            source="cam", seq=2, labels=["rods"], novelty=None,
            probabilities=probabilities), 1.0)  # type: ignore[arg-type]
    assert st.unshown == 1 and "ValueError" in (st.last_unshown or "")
    lines = render(st, _TailSub(), 1.0)  # type: ignore[arg-type]
    row = next(ln for ln in lines if ln.startswith("cam "))
    assert row.endswith(" -")  # labels without probabilities: no class to show
    assert any("refused: 2 undecodable, 1 not shown" in ln for ln in lines), lines


def test_tail_keeps_the_most_recently_seen_sources() -> None:
    from nanoscout.clients import tail
    from nanoscout.wire.protocol import DetHeader

    st = tail.TailState()
    n = tail.MAX_SOURCES + 10
    for i in range(n):
        st.update(DetHeader(source=f"s{i:04d}", seq=1, t_acq_ns=1, t_recv_ns=2, t_done_ns=3,
                            pixel_size_nm=None, units="px", n=1, engine="e"), 1.0)
        st.update(DetHeader(source="s0000", seq=i, t_acq_ns=1, t_recv_ns=2, t_done_ns=3,
                            pixel_size_nm=None, units="px", n=1, engine="e"), 1.0)
    assert len(st.sources) == tail.MAX_SOURCES and st.sources_forgotten == 10
    assert "s0000" in st.sources and f"s{n - 1:04d}" in st.sources and "s0001" not in st.sources
    lines = tail.render(st, _TailSub(), 1.0)  # type: ignore[arg-type]
    assert sum(ln.startswith("s0") for ln in lines) == tail.MAX_SOURCES
