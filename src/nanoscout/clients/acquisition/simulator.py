"""Virtual microscope: renders specimen frames with exact ground truth and streams them.

The specimen comes from :mod:`nanoscout.sim.synthetic`. The virtual stage rasters over ``fields``
fields of view (each its own specimen area, ``field_um`` apart) and dwells ``dwell`` frames on
each; every frame is a fresh acquisition (new shot noise, and ``drift_px_per_frame`` of
specimen drift accumulating while the stage dwells). With ``insitu`` one field of view is
watched while its particles change (E-TEM, :class:`nanoscout.sim.insitu.InSituSeries`): they
drift with the specimen (``drift_px_per_frame``), move (Brownian steps, and a share of them
steadily), grow (``growth``: Ostwald ripening, uniform growth, or none), coalesce, and new
ones appear (``appear_per_frame``); identities persist across frames.

Ground truth can be written per frame (``truth_dir/<source>-<seq>.npz``: ``labels``, the
instance map; ``ids``, ``ecd_nm``, ``x``, ``y`` (px) of the particles; ``shift_px`` (rows,
cols: the content's drift since the first frame); ``events`` (in-situ: JSON list of merges,
appearances and dissolutions before this frame, with the ids involved)) for end-to-end
accuracy and tracking checks.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from nanoscout.clients.acquisition.publisher import FramePublisher, Mode, SendReport
from nanoscout.sim.insitu import InSituSeries
from nanoscout.sim.synthetic import Specimen, SpecimenConfig, SyntheticFrame
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.headers import MAX_SIDE_PX
from nanoscout.wire.transport import ClientKeys

#: the largest frame the simulator renders, bytes: the daemon's default
#: ``input.max_frame_bytes`` (a larger one would be refused there, and the generator holds
#: several float64 copies of it)
MAX_FRAME_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SimulatorOptions:
    """What the virtual microscope streams. Sizes in px, pixel size and diameters in nm."""

    endpoint: str
    mode: Mode = "auto"  # push (lossless daemon), pub (live), auto (whichever it takes)
    results: str | None = None  # the daemon's result endpoint: confirm each frame (lossless)
    confirm_timeout_s: float = 30.0  # at the end: wait this long without an answer, at most
    source: str = "sim"
    rate_hz: float | None = 5.0  # None = as fast as the daemon accepts
    frames: int | None = None  # None = until stopped
    shape: tuple[int, int] = (1024, 1024)
    dtype: Literal["uint8", "uint16", "float32"] = "uint16"
    pixel_size_nm: float = 0.5
    modality: Literal["TEM", "STEM", "SEM"] = "TEM"
    median_diameter_nm: float = 8.0
    dose_e_per_px: float | None = 200.0
    support_grains: float = 0.0  # supported catalyst: area fraction of large support grains
    seed: int = 0
    fields: int = 4
    dwell: int = 5
    field_um: float = 2.0
    drift_px_per_frame: tuple[float, float] = (0.0, 0.0)  # specimen drift (rows, cols) while dwelling
    insitu: bool = False
    growth: Literal["ripening", "uniform", "none"] = "ripening"  # in-situ growth law
    growth_nm_per_frame: float = 0.02  # in-situ growth rate of the radius, nm per frame
    appear_per_frame: float = 0.0  # in-situ nucleation: new particles per frame
    truth_dir: Path | None = None
    calibrated: bool = True  # False sends frames without pixel size (tests uncalibrated handling)
    curve: ClientKeys | None = None  # CURVE identity for a remote daemon

    def __post_init__(self) -> None:
        """Raise ConfigError, naming the value, for options the simulator cannot stream."""
        rows, cols = self.shape
        if not (8 <= rows <= MAX_SIDE_PX and 8 <= cols <= MAX_SIDE_PX):
            raise ConfigError(f"shape {self.shape!r} must be 8..{MAX_SIDE_PX} px on each side")
        nbytes = rows * cols * np.dtype(self.dtype).itemsize
        if nbytes > MAX_FRAME_BYTES:
            raise ConfigError(f"a {rows}x{cols} {self.dtype} frame is {nbytes} bytes, more than "
                              f"{MAX_FRAME_BYTES} (the daemon's default max_frame_bytes)")
        if self.rate_hz is not None and not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ConfigError(f"rate_hz {self.rate_hz!r} must be a finite rate > 0 Hz or None")
        if self.frames is not None and self.frames < 0:
            raise ConfigError(f"frames {self.frames!r} must be >= 0 or None")
        if self.fields < 1 or self.dwell < 1:
            raise ConfigError(f"fields {self.fields!r} and dwell {self.dwell!r} must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"seed {self.seed!r} must be >= 0")
        numbers = [("pixel_size_nm", self.pixel_size_nm), ("field_um", self.field_um),
                   ("median_diameter_nm", self.median_diameter_nm),
                   ("dose_e_per_px", 0.0 if self.dose_e_per_px is None else self.dose_e_per_px),
                   ("support_grains", self.support_grains),
                   ("growth_nm_per_frame", self.growth_nm_per_frame),
                   ("appear_per_frame", self.appear_per_frame),
                   *(("drift_px_per_frame", v) for v in self.drift_px_per_frame)]
        for name, value in numbers:
            if not math.isfinite(value):
                raise ConfigError(f"{name} {value!r} must be finite")
        if self.appear_per_frame < 0:
            raise ConfigError(f"appear_per_frame {self.appear_per_frame!r} must be >= 0")
        try:
            specimen_config(self)  # pixel size, diameter, dose, support grains ...
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def specimen_config(opts: SimulatorOptions) -> SpecimenConfig:
    """The generator configuration for these simulator options."""
    return replace(
        SpecimenConfig(),
        modality=opts.modality,
        shape=opts.shape,
        pixel_size_nm=opts.pixel_size_nm,
        median_diameter_nm=opts.median_diameter_nm,
        dose_e_per_px=opts.dose_e_per_px,
        dtype=opts.dtype,
        support_grains=opts.support_grains,
        support_grain_nm=25.0 * opts.median_diameter_nm,
    )


def frames(opts: SimulatorOptions) -> Iterator[tuple[SyntheticFrame, tuple[float, float]]]:
    """Endless (frame, stage position in µm) pairs of the virtual acquisition."""
    cfg = specimen_config(opts)
    rng = np.random.default_rng(opts.seed)
    if opts.insitu:
        interval = 1.0 / opts.rate_hz if opts.rate_hz else 1.0
        series = InSituSeries(replace(cfg, drift_px_per_frame=opts.drift_px_per_frame),
                              opts.seed, n_frames=opts.frames, growth=opts.growth,
                              growth_nm_per_frame=opts.growth_nm_per_frame,
                              appear_per_frame=opts.appear_per_frame,
                              directed_fraction=0.1, directed_nm_per_frame=0.1,
                              frame_interval_s=interval)
        for frame in series:
            yield frame, (0.0, 0.0)
        return
    cache: dict[int, Specimen] = {}
    side = max(1, int(np.ceil(np.sqrt(opts.fields))))
    k = 0
    while True:
        field = (k // opts.dwell) % opts.fields
        spec = cache.get(field)
        if spec is None:
            spec = cache[field] = Specimen.generate(cfg, opts.seed * 1000 + field)
        row, col = divmod(field, side)
        if row % 2:  # serpentine raster
            col = side - 1 - col
        dwelt = k % opts.dwell
        shift = (dwelt * opts.drift_px_per_frame[0], dwelt * opts.drift_px_per_frame[1])
        yield spec.acquire(rng, shift_px=shift), (col * opts.field_um, row * opts.field_um)
        k += 1


def _write_truth(truth_dir: Path, source: str, seq: int, frame: SyntheticFrame) -> None:
    truth = frame.truth
    events = [{"kind": e.kind, "parents": list(e.parents), "children": list(e.children),
               "x": e.x, "y": e.y} for e in frame.events]
    np.savez_compressed(
        truth_dir / f"{source}-{seq:06d}.npz",
        labels=frame.labels,
        ids=np.asarray(truth["id"]),
        ecd_nm=np.asarray(truth["ecd_nm"]),
        x=np.asarray(truth["x"]),
        y=np.asarray(truth["y"]),
        shift_px=np.asarray(frame.shift_px),
        events=np.asarray(json.dumps(events)),
    )


def run_simulator(
    opts: SimulatorOptions,
    *,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
) -> SendReport:
    """Stream frames to the daemon until ``opts.frames`` are sent or ``stop`` is set.

    Returns what was sent and (lossless, with a result endpoint) confirmed. In ``push`` mode
    ``send`` blocks while the daemon is behind (lossless back-pressure); at the end the
    publisher waits for the daemon's answers (:class:`FramePublisher`).
    """
    stop = stop or threading.Event()
    if opts.truth_dir is not None:
        opts.truth_dir.mkdir(parents=True, exist_ok=True)
    period = 1.0 / opts.rate_hz if opts.rate_hz else 0.0
    sent = 0
    pub = FramePublisher(opts.endpoint, mode=opts.mode, source=opts.source, curve=opts.curve,
                         results=opts.results, confirm_timeout_s=opts.confirm_timeout_s,
                         log_line=log)
    log(f"simulator: streaming {opts.modality} {opts.shape[0]}x{opts.shape[1]} {opts.dtype} "
        f"at {opts.pixel_size_nm} nm/px to {opts.endpoint} ({pub.mode})")
    report = pub.report
    t_next = time.monotonic()
    try:
        for frame, stage in frames(opts):
            if stop.is_set() or opts.frames == 0:
                break
            if period:
                delay = t_next - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                # no drift accumulation, but never try to catch up a backlog in a burst
                t_next = max(t_next + period, time.monotonic() - period)
            seq = pub.send(
                frame.image,
                pixel_size_nm=opts.pixel_size_nm if opts.calibrated else None,
                modality=opts.modality,
                stage=stage,
                meta={"simulated": True},
            )
            if opts.truth_dir is not None:
                _write_truth(opts.truth_dir, opts.source, seq, frame)
            sent += 1
            if opts.frames is not None and sent >= opts.frames:
                break
    finally:  # stopped by Ctrl-C or SIGTERM too: what was sent is still reported
        report = pub.close()
        log(f"simulator: {report.describe()}")
    return report
