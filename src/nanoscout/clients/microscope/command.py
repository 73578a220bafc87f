"""``nanoscout microscope``: the simulated microscope (virtual specimen, stage, camera) serving
its control socket and publishing every frame it takes to the daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoscout.clients.acquisition.publisher import FramePublisher
from nanoscout.clients.microscope.control import DEFAULT_CONTROL_ENDPOINT, ControlServer
from nanoscout.stopping import StopEvent
from nanoscout.wire.transport import DEFAULT_FRAME_ENDPOINT, ClientKeys


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


def run(args: argparse.Namespace, curve: ClientKeys | None) -> int:
    """Serve until interrupted (SIGINT / SIGTERM)."""
    from dataclasses import replace

    from nanoscout.clients.microscope.simulated import (
        SimulatedMicroscopeOptions,
        build,
        write_truth,
    )
    from nanoscout.sim.virtual_specimen import VirtualSpecimenConfig

    cfg = replace(VirtualSpecimenConfig(), size_um=tuple(args.specimen_um), seed=args.seed,
                  large_targets=args.large, wire_targets=args.wires,
                  agglomerates=args.agglomerates, median_diameter_nm=args.diameter,
                  coverage=args.coverage, modality=args.modality)
    opts = SimulatedMicroscopeOptions(
        speed_um_s=args.speed, settle_s=args.settle, exposure_s=args.exposure,
        dose_e_per_px=args.dose or None, real_time=args.real_time, seed=args.seed)
    spec, stage, camera = build(cfg, opts)
    if args.truth:
        write_truth(spec, args.truth)
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
