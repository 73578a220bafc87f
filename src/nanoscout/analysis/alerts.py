"""Alert evaluation: which configured rules (:mod:`nanoscout.analysis.rules`) fire on a frame,
with per-rule, per-source rate limiting and de-duplication.

``particle``, ``count``, ``d50_drift`` and the in-situ ``coalescence``, ``growth_rate`` and
``count_drop`` rules are evaluated per frame by
:meth:`AlertEngine.evaluate`; ``class`` and ``novelty`` rules by
:meth:`AlertEngine.evaluate_class` on each classified frame, and their alerts carry the
class activation map that explains them (``Alert.heatmap``): a class rule's the CAM of its
own label (which need not be the top class: ``needle > 0.3`` fires on a frame whose top class
is ``isolated_particles``), a novelty rule's the top class's.

Two clocks time the cooldowns: the frame's acquisition time ``t_ns`` and its arrival at the
daemon, ``t_recv_ns`` (the daemon's wall clock), both ns. A cooldown ends when either has
advanced ``cooldown_s`` since the firing, or when the acquisition clock went back (a
restarted source). So a source whose clock does not advance (``t_acq_ns`` 0 on every frame,
a camera clock that stopped) is still limited to one firing per ``cooldown_s`` of the
daemon's time: on the acquisition clock alone a rule fired once on it and never again.
Without ``t_recv_ns`` the arrival clock is the acquisition clock; an offline frame arrives
when it was acquired (:meth:`nanoscout.analysis.frame.Frame.from_image`), so ``nanoscout
measure`` runs on the frame times alone and stays deterministic.

Rate limiting and de-duplication (per rule and per source):

* ``count``, ``d50_drift``, the in-situ, ``class`` and ``novelty`` rules fire at most once per
  ``cooldown_s``; a firing inside the
  cooldown is suppressed and counted in :attr:`AlertEngine.suppressed`.
* A ``particle`` rule remembers the particles it reported for ``cooldown_s`` (forgotten when
  either clock has advanced that much, or the acquisition clock went back). A matching
  particle is a duplicate when it lies within the de-duplication radius of a remembered one
  seen at the same stage position (both None, or equal within ``stage_tolerance_um``). The
  radius is ``dedup_radius_nm`` when set and the frame is calibrated, else the larger of the two
  particles' ECDs. With tracking on, a particle that carries the ``track_id`` of a remembered
  one (seen at the same stage position) is a duplicate however far it went: the specimen
  drifting under a fixed stage moves it farther than its ECD within a few frames.
  A frame whose matching particles are all duplicates is a suppressed firing
  (counted); otherwise the rule fires, listing the new particles first, and remembers them all.
  So a particle sitting (or drifting, when tracked) in a live view is reported once per
  cooldown, while a new particle (or the stage moving on) is reported at once. A cooldown of
  1e10 s or more never ends. Distances need the pixel size: pass
  ``pixel_size_nm`` to :meth:`AlertEngine.evaluate`; without it a calibrated frame falls back
  to "centroid inside the other particle's bounding box".
* Uncalibrated frames (``units == "px"``): a rule with conditions on ``*_nm``/``*_nm2`` fields
  does not fire; this is logged once per rule and source and counted in
  :attr:`AlertEngine.skipped_uncalibrated`.

``Alert.value`` / ``Alert.threshold``: for a particle rule, the most extreme value of the first
numeric condition among the new matching particles (largest for gt/ge, smallest for lt/le;
that particle is listed first and named in the explanation) and that condition's threshold,
or the number of matches and ``min_count`` when the rule has only a ``shape_class``
condition; for a count rule the count and the crossed bound; for a drift rule the change in
percent and ``pct`` (negative for a shrinking D50); for a class rule the label's probability
and ``threshold``; for a novelty rule the novelty score and ``threshold``; for a coalescence
rule the merge events on the frame and ``min_count``; for a growth-rate rule the tracks'
median dECD/dt and the crossed bound; for a count-drop rule the count's change in percent
(negative) and ``-pct``.

Confidences (``count = "expected"``, ``Alert.confidence``) read a calibrated ``score`` as the
statistics weigh it: NaN as 0, clipped to 0..1.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from nanoscout.analysis.explain import explain_particles, number
from nanoscout.analysis.rules import (
    OPERATORS,
    AnyRule,
    ClassRule,
    CoalescenceRule,
    CountDropRule,
    CountRule,
    D50DriftRule,
    GrowthRateRule,
    NoveltyRule,
    ParticleRule,
    check_class_labels,
    check_rule_inputs,
    check_unique_names,
    needs_confidence,
    parse_rules,
)
from nanoscout.analysis.stats import confidences
from nanoscout.wire.errors import FrameError
from nanoscout.wire.headers import Stage, Units
from nanoscout.wire.particles import PARTICLE_DTYPE

__all__ = ["MAX_ALERT_PARTICLES", "Alert", "AlertEngine", "check_class_labels",
           "check_rule_inputs", "parse_rules"]

log = logging.getLogger(__name__)

MAX_ALERT_PARTICLES = 20
# reported particles remembered per rule and source (oldest forgotten first)
_MAX_REMEMBERED = 4096
# a cooldown at least this long (s) never ends: longer than the int64 ns clock spans (292
# years), and short enough to be counted in ns (1e300 s overflowed)
_FOREVER_S = 1e10


@dataclass(frozen=True)
class Alert:
    """One rule that fired on one frame."""

    rule: str
    kind: str
    severity: str
    #: e.g. the largest ECD found (nm, or px when uncalibrated) ...
    value: float
    #: ... versus the rule's threshold
    threshold: float
    #: one sentence, e.g. "particle 12 has ECD 63.2 nm > 50 nm (rule big-particle)"
    explanation: str
    #: PARTICLE_DTYPE rows that fired (at most 20; new ones first); empty for frame-level rules
    particles: np.ndarray = field(compare=False, repr=False)
    #: uint8 class activation map explaining a class alert (its label's) or a novelty alert
    #: (the top class's), over the whole frame; else None
    heatmap: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: particle rule on a frame calibrated in confidence: the probability (0..1) that the
    #: particle described (the first row) is real; count rule with ``count = "expected"``:
    #: the mean confidence of the particles counted (``value`` is their sum). None otherwise
    confidence: float | None = None


@dataclass
class _Memory:
    """Particles a particle rule reported for one source, for de-duplication."""

    t_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    t_recv: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # arrival, ns
    stage: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # NaN = no stage
    xy: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # px
    radius: np.ndarray = field(default_factory=lambda: np.empty(0))  # px, NaN = unknown
    bbox: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))  # px
    track: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # 0 = untracked


class AlertEngine:
    """Evaluates alert rules frame by frame, with per-rule, per-source rate limiting."""

    def __init__(self, rules: Sequence[AnyRule]) -> None:
        self.rules = tuple(rules)
        check_unique_names([r.name for r in self.rules])
        #: rule name -> firings rate-limited or de-duplicated so far
        self.suppressed: dict[str, int] = {r.name: 0 for r in self.rules}
        #: rule name -> frames on which an nm rule was not evaluated (uncalibrated frame)
        self.skipped_uncalibrated: dict[str, int] = {r.name: 0 for r in self.rules}
        #: rule name -> frames on which a rule that reads confidences was not evaluated (the
        #: frame's scores are raw: its detector has no score calibration)
        self.skipped_raw_scores: dict[str, int] = {r.name: 0 for r in self.rules}
        #: (rule, source) -> (acquisition time, arrival time) of the last firing, ns
        self._last_fired: dict[tuple[str, str], tuple[int, int]] = {}
        self._memory: dict[tuple[str, str], _Memory] = {}
        self._warned: set[tuple[str, str]] = set()
        self._warned_raw: set[tuple[str, str]] = set()
        #: count_drop rules: the previous frames' counts per (rule, source)
        self._counts: dict[tuple[str, str], deque[float]] = {}

    def forget(self, source: str) -> None:
        """Drop everything remembered of ``source`` (cooldowns, reported particles)."""
        for store in (self._last_fired, self._memory, self._counts):
            for key in [k for k in store if k[1] == source]:
                del store[key]
        self._warned = {k for k in self._warned if k[1] != source}
        self._warned_raw = {k for k in self._warned_raw if k[1] != source}

    def evaluate(
        self,
        *,
        source: str,
        t_ns: int,
        stage: Stage | None,
        table: np.ndarray,
        stats: dict[str, Any] | None,
        units: Units,
        pixel_size_nm: float | None = None,
        events: Sequence[Mapping[str, Any]] = (),
        insitu: Mapping[str, Any] | None = None,
        calibrated: bool = False,
        t_recv_ns: int | None = None,
    ) -> list[Alert]:
        """Evaluate every rule on one frame; returns the alerts that fired, in rule order.

        ``t_ns``: frame (acquisition) time and ``t_recv_ns``: its arrival at the daemon (ns;
        None: ``t_ns``), the two clocks of the cooldowns (module docstring). ``stage``: the
        frame's stage position (µm), or None.
        ``table``: the frame's PARTICLE_DTYPE table, lengths in ``units`` ("nm" or "px").
        ``stats``: the source's :meth:`SizeStatistics.snapshot` (needed by d50_drift rules).
        ``pixel_size_nm``: nm per pixel of a calibrated frame, for de-duplication distances.
        ``events``: the tracker's merge / split events on this frame (``det.tracking.events``)
        and ``insitu``: the source's ``stats.insitu`` block (coalescence and growth-rate rules;
        without them those rules do not fire). ``calibrated``: the table's ``score`` column
        holds probabilities (the detector's card has a score calibration); without it the
        rules that read confidences do not fire (:attr:`skipped_raw_scores`).
        """
        if table.dtype != PARTICLE_DTYPE:
            raise FrameError(f"alerts need a PARTICLE_DTYPE table, got dtype {table.dtype}")
        if units not in ("nm", "px"):
            raise FrameError(f"units must be 'nm' or 'px', got {units!r}")
        ctx = _Context(source, int(t_ns), stage, table, stats, units, pixel_size_nm,
                       calibrated, int(t_ns if t_recv_ns is None else t_recv_ns))
        fired: list[Alert] = []
        for rule in self.rules:
            alert: Alert | None
            if not calibrated and needs_confidence(rule):
                self._skip_raw(rule, ctx.source)
                continue
            if isinstance(rule, ParticleRule):
                alert = self._particle(rule, ctx)
            elif isinstance(rule, CountRule):
                alert = self._rate_limited(rule, ctx.source, ctx.clock, _count(rule, ctx))
            elif isinstance(rule, D50DriftRule):
                alert = self._rate_limited(rule, ctx.source, ctx.clock, _drift(rule, ctx))
            elif isinstance(rule, CoalescenceRule):
                alert = self._rate_limited(rule, ctx.source, ctx.clock,
                                           _coalescence(rule, events))
            elif isinstance(rule, GrowthRateRule):
                alert = self._rate_limited(rule, ctx.source, ctx.clock,
                                           _growth(rule, insitu, units))
            elif isinstance(rule, CountDropRule):
                alert = self._rate_limited(rule, ctx.source, ctx.clock,
                                           self._count_drop(rule, ctx))
            else:
                continue  # class / novelty rules: evaluate_class
            if alert is not None:
                fired.append(alert)
        return fired

    def evaluate_class(
        self,
        *,
        source: str,
        t_ns: int,
        labels: Sequence[str],
        probabilities: Sequence[float],
        novelty: float | None,
        heatmap: np.ndarray | None,
        cam_of: Callable[[str], np.ndarray | None] | None = None,
        t_recv_ns: int | None = None,
    ) -> list[Alert]:
        """Evaluate the class and novelty rules on one classified frame; returns those that fired.

        ``labels`` / ``probabilities``: the classifier's classes and their probabilities (0..1),
        in the same order (any subset; a rule whose label is absent does not fire).
        ``novelty``: the frame's novelty score, None without the lens (novelty rules skip).
        ``heatmap``: the uint8 CAM of the top class (the most probable of ``labels``; None
        without CAMs): a novelty alert carries it, and so does a class alert whose label is
        the top class. ``cam_of``: label -> the uint8 CAM of that class, or None
        (:meth:`nanoscout.analysis.classifier.Classification.cam_of`), called only for a class
        rule that fires (past its cooldown) on another label than the top class; such an
        alert carries that CAM, or none without ``cam_of`` (never the top class's map, which
        explains another class). Cooldowns as for count rules, on the frame time ``t_ns`` and
        its arrival ``t_recv_ns`` (ns; None: ``t_ns``).
        """
        if len(labels) != len(probabilities):
            raise FrameError(f"{len(labels)} class labels but {len(probabilities)} probabilities")
        prob = {str(k): float(p) for k, p in zip(labels, probabilities, strict=True)}
        top = max(prob, key=prob.__getitem__) if prob else None
        fired: list[Alert] = []
        for rule in self.rules:
            heat = heatmap
            if isinstance(rule, ClassRule):
                p = prob.get(rule.label)
                if p is None or not p > rule.threshold:
                    continue
                value = p
                text = (f"class {rule.label} has probability {p:.3f} > {number(rule.threshold)} "
                        f"(rule {rule.name})")
                if rule.label != top:
                    heat = None  # made below, once the cooldown lets the alert out
            elif isinstance(rule, NoveltyRule):
                if novelty is None or not novelty > rule.threshold:
                    continue
                value = float(novelty)
                text = (f"frame novelty {value:.3g} > {number(rule.threshold)}"
                        + (f" (top class {top} {prob[top]:.2f})" if top is not None else "")
                        + f" (rule {rule.name})")
            else:
                continue
            alert = Alert(
                rule=rule.name,
                kind=rule.kind,
                severity=rule.severity,
                value=value,
                threshold=float(rule.threshold),
                explanation=text,
                particles=np.empty(0, PARTICLE_DTYPE),
                heatmap=heat,
            )
            clock = (int(t_ns), int(t_ns if t_recv_ns is None else t_recv_ns))
            limited = self._rate_limited(rule, source, clock, alert)
            if limited is None:
                continue
            if isinstance(rule, ClassRule) and rule.label != top and cam_of is not None:
                limited = replace(limited, heatmap=cam_of(rule.label))
            fired.append(limited)
        return fired

    # ------------------------------------------------------------------ rule kinds

    def _skip_raw(self, rule: AnyRule, source: str) -> None:
        """Count (and log once per source) a rule that needs confidences on raw scores."""
        self.skipped_raw_scores[rule.name] += 1
        if (rule.name, source) not in self._warned_raw:
            self._warned_raw.add((rule.name, source))
            log.warning("alert rule %r reads particle confidences but the scores of source %r "
                        "are raw (its detector has no score calibration): it does not fire "
                        "on them", rule.name, source)

    def _count_drop(self, rule: CountDropRule, ctx: _Context) -> Alert | None:
        inside = ctx.table[~ctx.table["border"]]
        n: float = (float(confidences(inside["score"]).sum())
                    if rule.count == "expected" else len(inside))
        key = (rule.name, ctx.source)
        seen = self._counts.get(key)
        if seen is None:
            seen = self._counts[key] = deque(maxlen=rule.window_frames)
        what = "expected particles" if rule.count == "expected" else "particles"
        before = float(np.median(seen)) if len(seen) == rule.window_frames else None
        seen.append(n)
        if before is None or before <= 0 or n >= (1.0 - rule.pct / 100.0) * before:
            return None
        change = 100.0 * (n - before) / before
        return Alert(
            rule=rule.name, kind=rule.kind, severity=rule.severity, value=change,
            threshold=-float(rule.pct),
            explanation=(f"frame has {number(n)} {what}, {abs(change):.0f} % fewer than the median "
                         f"{number(before)} of the previous {rule.window_frames} frames "
                         f"(limit {number(rule.pct)} %, rule {rule.name})"),
            particles=np.empty(0, PARTICLE_DTYPE))

    def _rate_limited(
        self,
        rule: CountRule | D50DriftRule | CoalescenceRule | GrowthRateRule | CountDropRule
        | ClassRule | NoveltyRule,
        source: str,
        clock: tuple[int, int],
        alert: Alert | None,
    ) -> Alert | None:
        """``alert`` unless the rule fired on ``source`` within its cooldown; ``clock``: the
        frame's (acquisition, arrival) times, ns."""
        if alert is None:
            return None
        key = (rule.name, source)
        last = self._last_fired.get(key)
        if last is not None and _cooling(last, clock, _cooldown_ns(rule)):
            self.suppressed[rule.name] += 1
            return None
        self._last_fired[key] = clock
        return alert

    def _particle(self, rule: ParticleRule, ctx: _Context) -> Alert | None:
        table = ctx.table
        if ctx.units == "px" and rule.uses_nm:
            self.skipped_uncalibrated[rule.name] += 1
            if (rule.name, ctx.source) not in self._warned:
                self._warned.add((rule.name, ctx.source))
                log.warning(
                    "alert rule %r tests nm fields but frames of source %r are uncalibrated "
                    "(px): it does not fire on them",
                    rule.name,
                    ctx.source,
                )
            return None
        mask = np.ones(len(table), dtype=bool)
        if not rule.include_border:
            mask &= ~table["border"]
        for fname, op, value in rule.conditions:
            mask &= OPERATORS[op](table[fname], value)
        if rule.min_confidence is not None:
            mask &= table["score"] >= np.float32(rule.min_confidence)
        hits = table[mask]
        if len(hits) < rule.min_count:
            return None

        mem = self._recall(rule, ctx)
        scale = _scale(ctx)
        xy = np.stack([hits["x"], hits["y"]], axis=1).astype(np.float64)
        if scale is None:
            radius = np.full(len(hits), np.nan)
        elif rule.dedup_radius_nm is not None and ctx.units == "nm":
            radius = np.full(len(hits), rule.dedup_radius_nm / scale)
        else:
            radius = hits["ecd_nm"].astype(np.float64) / scale
        bbox = hits["bbox"].astype(np.float64)
        track = hits["track_id"].astype(np.int64)
        stage = np.array((np.nan, np.nan) if ctx.stage is None
                         else (ctx.stage.x_um, ctx.stage.y_um), np.float64)
        new = ~_duplicates(mem, rule.stage_tolerance_um, stage, xy, radius, bbox, track)
        if not new.any():
            self.suppressed[rule.name] += 1
            return None
        self._remember(rule, ctx.source, ctx.clock, stage, xy, radius, bbox, track)

        primary = next(((f, op, v) for f, op, v in rule.conditions if f != "shape_class"), None)
        if primary is None:
            order = np.argsort(~new, kind="stable")
            value, threshold = float(len(hits)), float(rule.min_count)
        else:
            fname, op, thr = primary
            vals = hits[fname].astype(np.float64)
            # new particles first, each group most extreme first; value = the first one's
            order = np.lexsort((-vals if op in ("gt", "ge") else vals, ~new))
            value, threshold = float(vals[order[0]]), float(thr)
        rows = hits[order[:MAX_ALERT_PARTICLES]]
        confidence = float(confidences(rows["score"][:1])[0]) if ctx.calibrated else None
        return Alert(
            rule=rule.name,
            kind=rule.kind,
            severity=rule.severity,
            value=value,
            threshold=threshold,
            explanation=explain_particles(rule, hits, order, int(new.sum()), ctx.units,
                                          confidence),
            particles=rows.copy(),
            confidence=confidence,
        )

    # ------------------------------------------------------------------ de-duplication memory

    def _recall(self, rule: ParticleRule, ctx: _Context) -> _Memory:
        """The rule's remembered particles for this source, without expired ones."""
        key = (rule.name, ctx.source)
        mem = self._memory.get(key)
        if mem is None:
            mem = self._memory[key] = _Memory()
        cooldown = _cooldown_ns(rule)
        age = ctx.t_ns - mem.t_ns
        live = (age >= 0) & (age < cooldown) & (ctx.t_recv_ns - mem.t_recv < cooldown)
        if not live.all():
            mem.t_ns, mem.t_recv = mem.t_ns[live], mem.t_recv[live]
            mem.stage, mem.xy = mem.stage[live], mem.xy[live]
            mem.radius, mem.bbox, mem.track = mem.radius[live], mem.bbox[live], mem.track[live]
        return mem

    def _remember(
        self,
        rule: ParticleRule,
        source: str,
        clock: tuple[int, int],
        stage: np.ndarray,
        xy: np.ndarray,
        radius: np.ndarray,
        bbox: np.ndarray,
        track: np.ndarray,
    ) -> None:
        mem = self._memory[(rule.name, source)]
        n = len(xy)
        mem.t_ns = np.concatenate([mem.t_ns, np.full(n, clock[0], np.int64)])[-_MAX_REMEMBERED:]
        mem.t_recv = np.concatenate([mem.t_recv, np.full(n, clock[1], np.int64)]
                                    )[-_MAX_REMEMBERED:]
        mem.stage = np.concatenate([mem.stage, np.tile(stage, (n, 1))])[-_MAX_REMEMBERED:]
        mem.xy = np.concatenate([mem.xy, xy])[-_MAX_REMEMBERED:]
        mem.radius = np.concatenate([mem.radius, radius])[-_MAX_REMEMBERED:]
        mem.bbox = np.concatenate([mem.bbox, bbox])[-_MAX_REMEMBERED:]
        mem.track = np.concatenate([mem.track, track])[-_MAX_REMEMBERED:]


@dataclass(frozen=True)
class _Context:
    """What the rules see of one frame."""

    source: str
    t_ns: int
    stage: Stage | None
    table: np.ndarray
    stats: dict[str, Any] | None
    units: Units
    pixel_size_nm: float | None
    #: the table's ``score`` column holds probabilities
    calibrated: bool = False
    #: the frame's arrival at the daemon, ns (the acquisition time where not known)
    t_recv_ns: int = 0

    @property
    def clock(self) -> tuple[int, int]:
        """The frame's (acquisition, arrival) times, ns: the cooldowns' two clocks."""
        return self.t_ns, self.t_recv_ns


def _scale(ctx: _Context) -> float | None:
    """Table length units per pixel: 1 when uncalibrated, the pixel size (nm) if known."""
    if ctx.units == "px":
        return 1.0
    if ctx.pixel_size_nm is not None and ctx.pixel_size_nm > 0:
        return float(ctx.pixel_size_nm)
    return None


def _duplicates(
    mem: _Memory,
    tolerance_um: float,
    stage: np.ndarray,
    xy: np.ndarray,
    radius: np.ndarray,
    bbox: np.ndarray,
    track: np.ndarray,
) -> np.ndarray:
    """Which particles lie near a remembered one seen at the same stage position, or carry
    its track id (``track``: 0 = untracked)."""
    if mem.t_ns.size == 0:
        return np.zeros(len(xy), dtype=bool)
    if np.isnan(stage).any():
        same = np.isnan(mem.stage).any(axis=1)
    else:
        same = (np.abs(mem.stage - stage) <= tolerance_um).all(axis=1)
    if not same.any():
        return np.zeros(len(xy), dtype=bool)
    m_xy, m_r, m_bb, m_track = mem.xy[same], mem.radius[same], mem.bbox[same], mem.track[same]
    # the tracker followed it there (a drifting field): the same particle, however far it went
    out = (track != 0) & np.isin(track, m_track)
    if np.isfinite(radius).all() and np.isfinite(m_r).all() and np.isfinite(xy).all():
        # the pairs within the largest radius from a k-d tree, then each pair's own radius:
        # the dense n x m distances cost 0.25 s for 2000 particles against 4096 remembered
        if len(xy) and len(m_xy):
            reach = float(max(radius.max(initial=0.0), m_r.max(initial=0.0)))
            pairs = cKDTree(xy).query_ball_tree(cKDTree(m_xy), reach)
            i = np.repeat(np.arange(len(xy)), [len(p) for p in pairs])
            j = np.fromiter((k for p in pairs for k in p), np.int64, count=i.size)
            d = np.hypot(xy[i, 0] - m_xy[j, 0], xy[i, 1] - m_xy[j, 1])
            hit = d <= np.maximum(radius[i], m_r[j])
            out[i[hit]] = True
        return out
    d = np.hypot(xy[:, None, 0] - m_xy[None, :, 0], xy[:, None, 1] - m_xy[None, :, 1])
    r = np.fmax(radius[:, None], m_r[None, :])
    near = d <= r
    # without a pixel size: centroid of one inside the other's bounding box (px, x1/y1 exclusive)
    unknown = np.isnan(r)
    if unknown.any():
        inside = _inside(xy[:, None, :], m_bb[None, :, :])
        inside |= _inside(m_xy[None, :, :], bbox[:, None, :])
        near = np.where(unknown, inside, near)
    return out | near.any(axis=1)


def _cooling(last: tuple[int, int], now: tuple[int, int], cooldown_ns: int) -> bool:
    """Whether a firing at ``last`` still holds off one at ``now`` ((acquisition, arrival)
    times, ns): less than ``cooldown_ns`` passed on both clocks, and the acquisition clock did
    not go back (a restarted source starts a new cooldown). A daemon clock set back counts as
    no time passed on it."""
    (t0, r0), (t, r) = last, now
    return t0 <= t < t0 + cooldown_ns and r - r0 < cooldown_ns


def _cooldown_ns(rule: AnyRule) -> int:
    """The rule's cooldown in ns (:data:`_FOREVER_S` and longer: beyond any frame time)."""
    return round(min(rule.cooldown_s, _FOREVER_S) * 1e9)


def _inside(p: np.ndarray, bb: np.ndarray) -> np.ndarray:
    return (
        (p[..., 0] >= bb[..., 0] - 0.5)
        & (p[..., 0] < bb[..., 2] - 0.5)
        & (p[..., 1] >= bb[..., 1] - 0.5)
        & (p[..., 1] < bb[..., 3] - 0.5)
    )


def _count(rule: CountRule, ctx: _Context) -> Alert | None:
    table = ctx.table if rule.include_border else ctx.table[~ctx.table["border"]]
    expected = rule.count == "expected"
    n: float = float(confidences(table["score"]).sum()) if expected else len(table)
    if rule.above is not None and n > rule.above:
        threshold, rel = rule.above, ">"
    elif rule.below is not None and n < rule.below:
        threshold, rel = rule.below, "<"
    else:
        return None
    return Alert(
        rule=rule.name,
        kind=rule.kind,
        severity=rule.severity,
        value=float(n),
        threshold=float(threshold),
        explanation=(f"frame has {number(n)} {'expected particles' if expected else 'particles'}"
                     f" {rel} {number(threshold)} (rule {rule.name})"),
        particles=np.empty(0, PARTICLE_DTYPE),
        confidence=round(n / len(table), 4) if expected and len(table) else None,
    )


def _drift(rule: D50DriftRule, ctx: _Context) -> Alert | None:
    drift = (ctx.stats or {}).get("drift") or {}
    change = drift.get("change_pct")
    if not drift.get("reference_complete") or change is None:
        return None
    grow = change > rule.pct and rule.direction in ("both", "grow")
    shrink = change < -rule.pct and rule.direction in ("both", "shrink")
    if not (grow or shrink):
        return None
    units = (ctx.stats or {}).get("units", ctx.units)
    text = (
        f"window D50 {number(drift['window_d50'])} {units} is {abs(change):.1f} % "
        f"{'above' if grow else 'below'} the reference D50 {number(drift['reference_d50'])} {units} "
        f"(limit {number(rule.pct)} %, rule {rule.name})"
    )
    return Alert(
        rule=rule.name,
        kind=rule.kind,
        severity=rule.severity,
        value=float(change),
        threshold=float(rule.pct if grow else -rule.pct),
        explanation=text,
        particles=np.empty(0, PARTICLE_DTYPE),
    )


def _coalescence(rule: CoalescenceRule, events: Sequence[Mapping[str, Any]]) -> Alert | None:
    merges = [e for e in events if e.get("kind") == "merge"]
    if len(merges) < rule.min_count:
        return None
    where = ", ".join(f"{'+'.join(str(p) for p in e.get('parents', []))} at "
                      f"({float(e.get('x', 0)):.0f}, {float(e.get('y', 0)):.0f}) px"
                      for e in merges[:3])
    more = f" and {len(merges) - 3} more" if len(merges) > 3 else ""
    return Alert(
        rule=rule.name, kind=rule.kind, severity=rule.severity, value=float(len(merges)),
        threshold=float(rule.min_count),
        explanation=(f"{len(merges)} coalescence(s) on this frame: tracks {where}{more} "
                     f"(rule {rule.name})"),
        particles=np.empty(0, PARTICLE_DTYPE))


def _growth(rule: GrowthRateRule, insitu: Mapping[str, Any] | None, units: Units
            ) -> Alert | None:
    if not insitu or insitu.get("growth_rate_d50") is None:
        return None
    if int(insitu.get("growth_tracks") or 0) < rule.min_tracks:
        return None
    g = float(insitu["growth_rate_d50"])
    if rule.above is not None and g > rule.above:
        bound, rel = rule.above, ">"
    elif rule.below is not None and g < rule.below:
        bound, rel = rule.below, "<"
    else:
        return None
    return Alert(
        rule=rule.name, kind=rule.kind, severity=rule.severity, value=g, threshold=float(bound),
        explanation=(f"median growth rate dECD/dt {g:.3g} {units}/s of "
                     f"{insitu['growth_tracks']} tracks {rel} {number(bound)} {units}/s "
                     f"(rule {rule.name})"),
        particles=np.empty(0, PARTICLE_DTYPE))
