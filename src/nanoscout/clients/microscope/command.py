"""``nanoscout microscope``: the simulated microscope (virtual specimen, stage, camera) serving
its control socket and publishing every frame it takes to the daemon."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import DEFAULT_CONTROL_ENDPOINT, ControlServer
from nanoscout.stopping import StopEvent
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.transport import DEFAULT_FRAME_ENDPOINT, ClientKeys

#: the widest virtual specimen side, µm (1 cm: more than any TEM grid or SEM stub)
MAX_SPECIMEN_UM = 10_000.0
#: the most ordinary particles a specimen may hold (about 1 mm x 1 mm at the defaults: some
#: seconds to draw and ~100 MB; 10x more takes minutes)
MAX_PARTICLES = 1_000_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nanoscout microscope``."""
    p.add_argument("--connect", default=DEFAULT_FRAME_ENDPOINT, help="the daemon's frame input")
    p.add_argument("--mode", choices=["auto", "push", "pub"], default="auto",
                   help="push (lossless daemon), pub (live daemon) or auto: whichever the daemon "
                        "takes (default auto)")
    p.add_argument("--source", default="stage")
    p.add_argument("--control", default=DEFAULT_CONTROL_ENDPOINT,
                   help=f"control endpoint to bind (REP; default {DEFAULT_CONTROL_ENDPOINT}; "
                        "port 0 = any)")
    p.add_argument("--specimen-um", type=float, nargs=2, default=(200.0, 200.0),
                   metavar=("W", "H"), help="virtual specimen size, µm")
    p.add_argument("--seed", type=int, default=0, help="draws the specimen")
    p.add_argument("--large", type=int, default=12, help="rare large particles (targets)")
    p.add_argument("--wires", type=int, default=12, help="rare long wires (targets)")
    p.add_argument("--agglomerates", type=int, default=30,
                   help="agglomerates of ordinary particles (look like targets from afar)")
    p.add_argument("--diameter", type=float, default=200.0,
                   help="median diameter of the ordinary particles, nm")
    p.add_argument("--coverage", type=float, default=0.03,
                   help="area fraction of ordinary particles")
    p.add_argument("--modality", choices=["TEM", "STEM", "SEM"], default="TEM")
    p.add_argument("--dose", type=float, default=200.0, help="electrons/px per frame (0 = none)")
    p.add_argument("--exposure", type=float, default=0.5, help="modelled exposure per frame, s")
    p.add_argument("--speed", type=float, default=100.0, help="modelled stage speed, µm/s")
    p.add_argument("--settle", type=float, default=0.3, help="modelled settle time per move, s")
    p.add_argument("--real-time", action="store_true",
                   help="really wait the modelled move and exposure times")
    p.add_argument("--truth", type=Path, help="write the specimen's ground truth (JSON) here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --truth file that is not an earlier run's truth")


def _is_truth_file(path: Path) -> bool:
    """Whether ``path`` holds a specimen's ground truth as :func:`write_truth` writes it (an
    earlier run's, which a new run replaces as a matter of course)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "n_particles", "targets",
                                       "agglomerates_um"} <= data.keys()


def check_options(args: argparse.Namespace) -> None:
    """Raise ConfigError, naming the option and its value, for options the simulated
    microscope cannot serve (checked before the specimen is drawn or a socket opened)."""
    w, h = args.specimen_um
    if not all(math.isfinite(v) and 6.0 < v <= MAX_SPECIMEN_UM for v in (w, h)):
        raise ConfigError(f"--specimen-um {w:g} {h:g} must be finite, > 6 µm (targets keep 3 µm "
                          f"from the edge) and <= {MAX_SPECIMEN_UM:g} µm")
    checks = [("--diameter", args.diameter, 0.0, False), ("--speed", args.speed, 0.0, False),
              ("--settle", args.settle, 0.0, True), ("--exposure", args.exposure, 0.0, True),
              ("--dose", args.dose, 0.0, True), ("--coverage", args.coverage, 0.0, True)]
    for flag, value, low, closed in checks:
        if not (math.isfinite(value) and (value >= low if closed else value > low)):
            raise ConfigError(f"{flag} {value!r} must be a finite number "
                              f"{'>=' if closed else '>'} {low:g}")
    if not args.coverage < 0.5:
        raise ConfigError(f"--coverage {args.coverage!r} must be an area fraction below 0.5")
    for flag, count in (("--large", args.large), ("--wires", args.wires),
                        ("--agglomerates", args.agglomerates), ("--seed", args.seed)):
        if count < 0:
            raise ConfigError(f"{flag} {count!r} must be >= 0")
    # the ordinary particles drawn (lognormal, sigma_log 0.25: mean area = median's * e^0.125)
    n = args.coverage * w * h * 1e6 / (math.pi / 4 * args.diameter**2 * math.exp(0.125))
    if n > MAX_PARTICLES:
        raise ConfigError(f"--specimen-um {w:g} {h:g} at --coverage {args.coverage:g} and "
                          f"--diameter {args.diameter:g} nm makes ~{n:.3g} particles, more than "
                          f"{MAX_PARTICLES}: use a smaller specimen, a lower coverage or a "
                          f"larger diameter")
    truth: Path | None = args.truth
    if truth is not None:
        if truth.is_dir():
            raise ConfigError(f"--truth {truth} is a folder, not a file")
        if not truth.parent.is_dir():
            raise ConfigError(f"--truth {truth}: folder {truth.parent} does not exist")
        if (truth.exists() or truth.is_symlink()) and not getattr(args, "overwrite", False) \
                and not _is_truth_file(truth):
            raise ConfigError(f"--truth {truth} exists and is not a truth file this command "
                              "wrote (--overwrite replaces it)")


def run(args: argparse.Namespace, curve: ClientKeys | None) -> int:
    """Serve until interrupted (SIGINT / SIGTERM); returns the exit status (0).

    Raises ConfigError for bad options (:func:`check_options`), a specimen whose targets do not
    fit, or a --truth file that cannot be written."""
    from dataclasses import replace

    from nanoscout.clients.microscope.simulated import (
        SimulatedMicroscopeOptions,
        build,
        write_truth,
    )
    from nanoscout.sim.virtual_specimen import VirtualSpecimenConfig

    check_options(args)
    opts = SimulatedMicroscopeOptions(
        speed_um_s=args.speed, settle_s=args.settle, exposure_s=args.exposure,
        dose_e_per_px=args.dose or None, real_time=args.real_time, seed=args.seed)
    try:
        cfg = replace(VirtualSpecimenConfig(), size_um=tuple(args.specimen_um), seed=args.seed,
                      large_targets=args.large, wire_targets=args.wires,
                      agglomerates=args.agglomerates, median_diameter_nm=args.diameter,
                      coverage=args.coverage, modality=args.modality)
        spec, stage, camera = build(cfg, opts)
    except ValueError as exc:  # the targets do not fit ("cannot place 24 targets ...")
        raise ConfigError(f"{exc}: use a larger --specimen-um or fewer --large / --wires / "
                          f"--agglomerates") from exc
    if args.truth:
        try:
            write_truth(spec, args.truth)
        except OSError as exc:
            raise ConfigError(f"cannot write --truth {args.truth}: {exc.strerror or exc}"
                              ) from exc
    stop = StopEvent()  # set by SIGINT / SIGTERM without a lock (nanoscout.stopping)
    stop.on_signals()
    with FramePublisher(args.connect, mode=args.mode, source=args.source, curve=curve) as pub:
        server = ControlServer(args.control, stage, camera, pub).start()
        lim = stage.limits
        print(f"microscope: {cfg.size_um[0]:g} x {cfg.size_um[1]:g} µm virtual specimen, "
              f"{spec.n_particles} particles, {len(spec.targets)} targets; stage x "
              f"[{lim.x_min_um:g}, {lim.x_max_um:g}] y [{lim.y_min_um:g}, {lim.y_max_um:g}] µm",
              flush=True)
        print("NANOSCOUT-READY " + json.dumps({"control": server.endpoint, "source": args.source,
                                               "frames": args.connect}), flush=True)
        try:
            while not stop.wait(0.2):
                if server.error is not None:
                    break
        finally:
            server.close()
    print(f"microscope: {pub.seq} frames, {stage.travelled_um:.0f} µm of stage travel",
          flush=True)
    return 0
