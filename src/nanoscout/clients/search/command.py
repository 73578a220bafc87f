"""``nanoscout search``: drive the microscope through its control socket, read the daemon's
alerts and classifications, and write what was found as a navigator list.

Two timeouts: ``--result-timeout`` (s) is how long a frame's results from the daemon are
waited for; the microscope's own commands (a stage move blocks until settled, an acquisition
lasts its exposure) are given ``max(CONTROL_TIMEOUT_S, --result-timeout)``, so a short result
timeout never cuts a slow stage move short.

When the microscope fails mid-search the list of what was found so far is still written,
``search.json`` records why it stopped (``stopped`` "error", ``error`` the failure), and the
exit status is 2. SIGINT (Ctrl-C) or SIGTERM ends the search before its next frame: what it
found is written (``stopped`` "interrupted"), exit status 130. A search whose sweep left tiles
unimaged (the stage never got there, their results never came), or an adaptive search with
candidates never imaged, ends ``stopped`` "incomplete", exit status 3
(:data:`EXIT_INCOMPLETE`): ``search.json``'s ``coverage`` gives the share of the area imaged and
the missed tiles' centres (``unreachable_tiles``: those the stage refused to move to, e.g.
beyond a soft limit), and a line on stderr says so. Exit status 0 is a search that ran to its
end, or to the budget it was given (``stopped`` "budget: ...": the end asked for). So an
automated loop knows from the exit status alone whether the area was covered: 0 and a
``stopped`` "done" / "candidates exhausted", or the budget it set; 2, 3 and 130 not.

``--resume OUT/search.json`` takes such a raster search up again
(:mod:`nanoscout.clients.search.resume`): it refuses a search that is not the same one (area,
pixel size, frame shape, overlap, strategy, target rules, minimum separation), images only the
tiles the earlier run did not, and writes one result: the earlier targets and the new ones
without duplicates, ``coverage`` over both runs, ``resumed_from`` the earlier run,
``total`` every run's frames, time and dose (``search``'s numbers and budgets are the resumed
run's own). An earlier ``search.json`` the new one is written over is kept as
``search.run<N>.json``; ``search.json`` is replaced durably
(:func:`~nanoscout.clients.provenance.write_json`): a crash leaves the old one or the new.

``--budget-frames``, ``--budget-s`` and ``--budget-dose`` are limits the search's totals never
pass: a frame is taken only when its estimated cost fits what is left (see
:mod:`nanoscout.clients.search.strategies`). ``search.json`` gives each budget's spent vs
budget (``budgets``) and, when one stopped the search, by how much the frame it refused would
have passed it (``stop_detail``); the last line printed says the same.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from nanoscout.clients.microscope.control import ControlClient
from nanoscout.clients.provenance import write_json
from nanoscout.clients.search.navigator import FoundTarget, write_navigator
from nanoscout.clients.search.resume import Earlier, check_same, load_earlier
from nanoscout.clients.search.session import FrameResult, SearchSession
from nanoscout.clients.search.strategies import SearchConfig, SearchResult, run_search
from nanoscout.stopping import StopEvent
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.transport import ClientKeys

#: the least time a microscope command (move, acquire, crop) is given to answer, s
CONTROL_TIMEOUT_S = 30.0
#: exit status of a search the microscope's failure stopped (what it found is written)
EXIT_STOPPED_BY_ERROR = 2
#: exit status of a search a signal stopped (what it found is written), as for Ctrl-C
EXIT_INTERRUPTED = 130
#: exit status of a search that ended "incomplete": tiles (or candidates) never imaged and
#: analysed (what it found is written; ``--resume`` takes a raster search up again)
EXIT_INCOMPLETE = 3


def run(args: argparse.Namespace, curve: ClientKeys | None) -> int:
    """Run one search (``args.resume``: take up the earlier run whose search.json it names)
    and write its navigator list; exit status 0 when it ran to its end or its budget,
    :data:`EXIT_STOPPED_BY_ERROR` (with the list of what it found written) when the microscope
    failed, :data:`EXIT_INTERRUPTED` when a signal stopped it, :data:`EXIT_INCOMPLETE` when
    tiles or candidates were never imaged and analysed."""
    resume: Path | None = getattr(args, "resume", None)
    # before the microscope is asked anything: an earlier run that cannot be resumed
    earlier = None if resume is None else load_earlier(resume)
    control = ControlClient(args.control, timeout=max(CONTROL_TIMEOUT_S, args.result_timeout))
    session = SearchSession(control, args.connect, result_timeout_s=args.result_timeout,
                            curve=curve)
    area = args.area or session.limits
    if area is None:
        raise ConfigError("the microscope reports no stage limits: give --area")
    cfg = SearchConfig(
        area=area, target_rules=tuple(args.target_rule),
        candidate_rules=tuple(args.candidate_rule), pixel_size_nm=args.pixel_size,
        survey_pixel_size_nm=args.survey_pixel_size, shape=(args.size, args.size),
        overlap_um=args.overlap, budget_frames=args.budget_frames, budget_s=args.budget_s,
        budget_dose_e_per_nm2=args.budget_dose, min_separation_um=args.min_separation)

    def progress(res: FrameResult, new: list[FoundTarget]) -> None:
        x, y = res.geometry.center_um
        what = (res.error or f"{res.n_particles} particles, {len(res.alerts)} alerts")
        print(f"{res.purpose:7s} #{res.index:4d} ({x:8.2f}, {y:8.2f}) µm: {what}", flush=True)
        for t in new:
            print(f"  target {t.id}: {t.label} at ({t.x_um:.2f}, {t.y_um:.2f}) µm, "
                  f"confidence {t.confidence:.2f}", flush=True)

    stop = StopEvent()  # a signal ends the search between two frames; the list is written
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    installed = stop.on_signals()
    try:
        if earlier is not None:
            check_same(earlier, args.strategy, cfg)
        result = run_search(args.strategy, session, cfg, progress, stop,
                            None if earlier is None else earlier.prior)
    finally:
        session.close()
        control.close()
        for sig, handler in before.items():
            if installed and handler is not None:  # None: set outside Python
                signal.signal(sig, handler)
    summary = result.summary()
    meta = {"search": summary, "area_um": [area.x_min, area.x_max, area.y_min, area.y_max],
            "config": {"target_rules": list(cfg.target_rules),
                       "candidate_rules": list(cfg.candidate_rules),
                       "pixel_size_nm": cfg.pixel_size_nm,
                       "survey_pixel_size_nm": cfg.survey_pixel_size_nm,
                       "shape": list(cfg.shape), "overlap_um": cfg.overlap_um,
                       "min_separation_um": cfg.min_separation_um},
            "sweep": result.sweep_record(), "runs": 1, "resumed_from": None}
    args.out.mkdir(parents=True, exist_ok=True)
    if earlier is not None:
        _resumed(meta, result, earlier, args.out)
    paths = write_navigator(result.targets, args.out, meta=meta)
    write_json(args.out / "search.json", meta)
    print(f"search ({args.strategy}): {len(result.targets)} targets in {result.frames} frames "
          f"({result.instrument_s:.0f} s instrument time, {result.wall_s:.0f} s wall); "
          f"stopped: {result.stopped}; navigator: {paths['nav']}", flush=True)
    if result.budget_stop is not None:
        print(f"search: budget {result.budget_stop}", flush=True)
    if result.stopped == "incomplete":
        print(f"nanoscout search: incomplete: {len(result.missed_tiles)} of {result.tiles} "
              f"tiles were never imaged and analysed ({100 * result.coverage:.1f} % of the area "
              f"was){_refused(result)}; search.json lists them", file=sys.stderr,
              flush=True)
    if result.skipped_rows:
        print(f"search: {result.skipped_rows} alert rows were no target (non-finite position "
              f"or score) and were skipped", file=sys.stderr, flush=True)
    if result.error is not None:
        print(f"nanoscout search: error: {result.error} (stopped; the {len(result.targets)} "
              f"targets found so far are in {args.out})", file=sys.stderr, flush=True)
        return EXIT_STOPPED_BY_ERROR
    if result.stopped == "interrupted":
        print(f"nanoscout search: interrupted (the {len(result.targets)} targets found so far "
              f"are in {args.out})", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if result.stopped == "incomplete":
        return EXIT_INCOMPLETE
    return 0


def _resumed(meta: dict[str, object], result: SearchResult, earlier: Earlier, out: Path
             ) -> None:
    """Add to ``meta`` what the resumed run took up (``resumed_from``, ``runs``) and every
    run's costs (``total``); keep the earlier search.json when the new one goes over it."""
    kept = None
    if (out / "search.json").resolve() == earlier.path.resolve():
        kept = out / f"search.run{earlier.runs}.json"
        write_json(kept, earlier.meta)
    before = earlier.total()
    n_before = len(earlier.prior.frames)
    meta["runs"] = earlier.runs + 1
    meta["resumed_from"] = {
        "path": str(earlier.path.resolve()), "kept_as": None if kept is None else kept.name,
        "stopped": earlier.meta["search"]["stopped"], "targets": len(earlier.prior.targets),
        "imaged_frames": n_before,
        "area_fraction": earlier.meta["search"]["coverage"]["area_fraction"]}
    meta["total"] = {
        "frames": int(before["frames"]) + result.frames,
        "instrument_s": round(before["instrument_s"] + result.instrument_s, 2),
        "mean_dose_e_per_nm2": round(before["mean_dose_e_per_nm2"]
                                     + result.mean_dose_e_per_nm2, 4)}
    print(f"search: resumed {earlier.path} ({earlier.meta['search']['stopped']}; "
          f"{n_before} frames imaged, {len(earlier.prior.targets)} targets): "
          f"{len(result.imaged) - n_before} frames imaged now", flush=True)


def _refused(result: SearchResult) -> str:
    """``"; the stage refused to move to N of them"``, or "" when it refused none."""
    n = len(set(result.missed_tiles) & set(result.unreachable))
    return f"; the stage refused to move to {n} of them" if n else ""
