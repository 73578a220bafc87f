"""Alert rules: needle-in-a-haystack particles, particle counts, D50 drift, classes, novelty.

Rules come from the configuration as a list of dicts, parsed by :func:`parse_rules` into
frozen pydantic models (a discriminated union on ``kind``)::

    [[alerts]]                                  # a particle that meets every condition
    name = "big-particle"
    kind = "particle"
    severity = "warning"                        # info | warning | critical
    where = { ecd_nm = { gt = 50 } }            # gt/ge/lt/le/eq on numeric particle fields
    # min_count = 1, include_border = false, cooldown_s = 5, dedup_radius_nm = (its ECD)

    [[alerts]]
    name = "rods"
    kind = "particle"
    where = { aspect_ratio = { gt = 3 }, shape_class = { eq = "rod" } }

    [[alerts]]                                  # a rod longer than 50 nm
    name = "long-rod"
    kind = "particle"
    where = { shape_class = { eq = "rod" }, feret_max_nm = { gt = 50 } }

    [[alerts]]                                  # particles per frame above and/or below
    name = "crowded"
    kind = "count"
    above = 200                                 # fires when count > above (or count < below)

    [[alerts]]                                  # in-situ sintering / growth
    name = "sintering"
    kind = "d50_drift"
    pct = 10                                    # |window D50 / reference D50 - 1| > 10 %
    direction = "both"                          # or "grow" / "shrink"

    [[alerts]]                                  # field-of-view classifier (class.<source>)
    name = "wires"
    kind = "class"
    label = "rods_wires"                        # one of the classifier card's classes
    threshold = 0.9                             # fires when P(label) > threshold

    [[alerts]]                                  # the AI lens: an unusual field of view
    name = "something-new"
    kind = "novelty"
    threshold = 3.0                             # fires when the frame's novelty > threshold

``particle``, ``count`` and ``d50_drift`` rules are evaluated per frame by
:meth:`AlertEngine.evaluate`; ``class`` and ``novelty`` rules by
:meth:`AlertEngine.evaluate_class` on each classified frame, and their alerts carry the
class activation map that explains them (``Alert.heatmap``). A class rule's label can only be
checked against the classifier's classes once the model is loaded:
:func:`check_class_labels` (called at start-up) raises a :class:`ConfigError` for an unknown
one.

Several operators on one field, and several fields, must all hold. ``where = {}`` matches every
particle. The clock is the frame time ``t_ns``, so behaviour is deterministic.

Rate limiting and de-duplication (per rule and per source):

* ``count``, ``d50_drift``, ``class`` and ``novelty`` rules fire at most once per
  ``cooldown_s``; a firing inside the
  cooldown is suppressed and counted in :attr:`AlertEngine.suppressed`.
* A ``particle`` rule remembers the particles it reported for ``cooldown_s``. A matching
  particle is a duplicate when it lies within the de-duplication radius of a remembered one
  seen at the same stage position (both None, or equal within ``stage_tolerance_um``). The
  radius is ``dedup_radius_nm`` when set and the frame is calibrated, else the larger of the two
  particles' ECDs. A frame whose matching particles are all duplicates is a suppressed firing
  (counted); otherwise the rule fires, listing the new particles first, and remembers them all.
  So a particle sitting in a live view is reported once per cooldown, while a new particle (or
  the stage moving on) is reported at once. Distances need the pixel size: pass
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
and ``threshold``; for a novelty rule the novelty score and ``threshold``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from nanoscout.wire.errors import ConfigError, FrameError
from nanoscout.wire.particles import PARTICLE_DTYPE, SHAPE_CLASSES

__all__ = [
    "Alert",
    "AlertEngine",
    "AnyRule",
    "ClassRule",
    "CountRule",
    "D50DriftRule",
    "NoveltyRule",
    "ParticleRule",
    "Rule",
    "check_class_labels",
    "parse_rules",
]

log = logging.getLogger(__name__)

MAX_ALERT_PARTICLES = 20
# reported particles remembered per rule and source (oldest forgotten first)
_MAX_REMEMBERED = 4096

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "eq": operator.eq,
}
_OP_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "="}
#: fields a particle rule may test numerically (bbox is a vector, border has include_border)
NUMERIC_FIELDS: tuple[str, ...] = tuple(
    name for name in PARTICLE_DTYPE.names or () if name not in ("bbox", "border", "shape_class")
)
_LABELS = {
    "ecd_nm": "ECD",
    "area_nm2": "area",
    "feret_max_nm": "Feret max",
    "feret_min_nm": "Feret min",
    "major_nm": "major axis",
    "minor_nm": "minor axis",
    "orientation_deg": "orientation",
    "aspect_ratio": "aspect ratio",
    "x": "x",
    "y": "y",
}


class _RuleBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    severity: Literal["info", "warning", "critical"] = "warning"
    #: rate limit per rule and source, s (see the module docstring)
    cooldown_s: float = Field(5.0, ge=0)


class ParticleRule(_RuleBase):
    """Fires when at least ``min_count`` particles meet every condition of ``where``."""

    kind: Literal["particle"] = "particle"
    where: dict[str, dict[str, Any]]
    min_count: int = Field(1, ge=1)
    include_border: bool = False
    dedup_radius_nm: float | None = Field(None, gt=0)
    stage_tolerance_um: float = Field(0.05, ge=0)

    _conditions: tuple[tuple[str, str, float], ...] = PrivateAttr(default=())

    @field_validator("where")
    @classmethod
    def _check_where(cls, where: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for fname, ops in where.items():
            if fname != "shape_class" and fname not in NUMERIC_FIELDS:
                raise ValueError(
                    f"unknown particle field {fname!r}; known: shape_class, "
                    + ", ".join(NUMERIC_FIELDS)
                )
            if not isinstance(ops, dict) or not ops:
                raise ValueError(f"{fname}: expected a map such as {{gt = 50}}, got {ops!r}")
            for op, value in ops.items():
                if op not in _OPS:
                    raise ValueError(f"{fname}: unknown operator {op!r}; known: {', '.join(_OPS)}")
                if fname == "shape_class":
                    if op != "eq":
                        raise ValueError(f"shape_class: only 'eq' is allowed, got {op!r}")
                    if value not in SHAPE_CLASSES:
                        raise ValueError(
                            f"shape_class: unknown class {value!r}; known: "
                            + ", ".join(SHAPE_CLASSES)
                        )
                elif (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                ):
                    raise ValueError(f"{fname}.{op}: expected a finite number, got {value!r}")
        return where

    def model_post_init(self, context: Any, /) -> None:
        conds = []
        for fname, ops in self.where.items():
            for op, value in ops.items():
                v = SHAPE_CLASSES.index(value) if fname == "shape_class" else float(value)
                conds.append((fname, op, v))
        self._conditions = tuple(conds)

    @property
    def uses_nm(self) -> bool:
        """True when a condition needs calibrated lengths (a ``*_nm`` / ``*_nm2`` field)."""
        return any(f.endswith(("_nm", "_nm2")) for f in self.where)


class CountRule(_RuleBase):
    """Fires when the number of particles in a frame is > ``above`` or < ``below``."""

    kind: Literal["count"] = "count"
    above: float | None = None
    below: float | None = None
    include_border: bool = False

    @model_validator(mode="after")
    def _check_bounds(self) -> CountRule:
        if self.above is None and self.below is None:
            raise ValueError("a count rule needs 'above' and/or 'below'")
        return self


class D50DriftRule(_RuleBase):
    """Fires when the window D50 differs from the reference D50 by more than ``pct`` percent."""

    kind: Literal["d50_drift"] = "d50_drift"
    pct: float = Field(gt=0)
    direction: Literal["both", "grow", "shrink"] = "both"


class ClassRule(_RuleBase):
    """Fires when the field-of-view classifier gives ``label`` a probability > ``threshold``."""

    kind: Literal["class"] = "class"
    label: str = Field(min_length=1)
    threshold: float = Field(ge=0, lt=1)


class NoveltyRule(_RuleBase):
    """Fires when the frame's novelty score (the AI lens) is > ``threshold``."""

    kind: Literal["novelty"] = "novelty"
    threshold: float = Field(gt=0)


AnyRule = ParticleRule | CountRule | D50DriftRule | ClassRule | NoveltyRule
Rule = Annotated[AnyRule, Field(discriminator="kind")]
_RULE_ADAPTER: TypeAdapter[AnyRule] = TypeAdapter(Rule)


def check_class_labels(rules: Sequence[AnyRule], classes: Sequence[str]) -> None:
    """Raise :class:`ConfigError` naming every class rule whose label is not in ``classes``.

    ``classes``: the field-of-view classifier's classes (its model card). Call once the
    classifier is loaded; rule labels cannot be checked earlier.
    """
    known = list(classes)
    bad = [r for r in rules if isinstance(r, ClassRule) and r.label not in known]
    if bad:
        which = "; ".join(f"alert rule {r.name!r}: unknown class label {r.label!r}" for r in bad)
        raise ConfigError(f"{which}; the classifier knows: {', '.join(known) or '(none)'}")


def parse_rules(data: list[dict[str, Any]]) -> list[AnyRule]:
    """Validate alert rules from the configuration; returns frozen rule models.

    Raises :class:`ConfigError` naming the rule (index and name) and the bad field or operator.
    """
    if not isinstance(data, list):
        raise ConfigError(f"alert rules must be a list of tables, got {type(data).__name__}")
    rules = []
    for i, item in enumerate(data):
        label = f"alert rule {i}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']!r})"
        if not isinstance(item, dict):
            raise ConfigError(f"{label}: expected a table, got {type(item).__name__}")
        try:
            rules.append(_RULE_ADAPTER.validate_python(item))
        except ValidationError as exc:
            problems = "; ".join(_describe(err) for err in exc.errors())
            raise ConfigError(f"{label}: {problems}") from exc
    _check_unique([r.name for r in rules])
    return rules


def _describe(err: Any) -> str:
    loc = list(err["loc"])
    if loc and loc[0] in ("particle", "count", "d50_drift", "class", "novelty"):
        loc = loc[1:]  # pydantic prefixes the union tag
    return f"{'.'.join(str(p) for p in loc) or 'rule'}: {err['msg']}"


def _check_unique(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"alert rule name {name!r} is used twice; names must be unique")
        seen.add(name)


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
    source: str = ""
    seq: int = 0
    t_ns: int = 0
    stage: tuple[float, float] | None = None
    #: uint8 class activation map explaining a class / novelty alert (whole frame), else None
    heatmap: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class _Memory:
    """Particles a particle rule reported for one source, for de-duplication."""

    t_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    stage: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # NaN = no stage
    xy: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # px
    radius: np.ndarray = field(default_factory=lambda: np.empty(0))  # px, NaN = unknown
    bbox: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))  # px


class AlertEngine:
    """Evaluates alert rules frame by frame, with per-rule, per-source rate limiting."""

    def __init__(self, rules: Sequence[AnyRule]) -> None:
        self.rules = tuple(rules)
        _check_unique([r.name for r in self.rules])
        #: rule name -> firings rate-limited or de-duplicated so far
        self.suppressed: dict[str, int] = {r.name: 0 for r in self.rules}
        #: rule name -> frames on which an nm rule was not evaluated (uncalibrated frame)
        self.skipped_uncalibrated: dict[str, int] = {r.name: 0 for r in self.rules}
        self._last_fired: dict[tuple[str, str], int] = {}
        self._memory: dict[tuple[str, str], _Memory] = {}
        self._warned: set[tuple[str, str]] = set()

    def evaluate(
        self,
        *,
        source: str,
        seq: int,
        t_ns: int,
        stage: tuple[float, float] | None,
        table: np.ndarray,
        stats: dict[str, Any] | None,
        units: str,
        pixel_size_nm: float | None = None,
    ) -> list[Alert]:
        """Evaluate every rule on one frame; returns the alerts that fired, in rule order.

        ``t_ns``: frame time (ns), the clock for cooldowns. ``stage``: (x, y) in µm or None.
        ``table``: the frame's PARTICLE_DTYPE table, lengths in ``units`` ("nm" or "px").
        ``stats``: the source's :meth:`SizeStatistics.snapshot` (needed by d50_drift rules).
        ``pixel_size_nm``: nm per pixel of a calibrated frame, for de-duplication distances.
        """
        if table.dtype != PARTICLE_DTYPE:
            raise FrameError(f"alerts need a PARTICLE_DTYPE table, got dtype {table.dtype}")
        if units not in ("nm", "px"):
            raise FrameError(f"units must be 'nm' or 'px', got {units!r}")
        ctx = _Frame(source, seq, int(t_ns), stage, table, stats, units, pixel_size_nm)
        fired: list[Alert] = []
        for rule in self.rules:
            alert: Alert | None
            if isinstance(rule, ParticleRule):
                alert = self._particle(rule, ctx)
            elif isinstance(rule, CountRule):
                alert = self._rate_limited(rule, ctx.source, ctx.t_ns, _count(rule, ctx))
            elif isinstance(rule, D50DriftRule):
                alert = self._rate_limited(rule, ctx.source, ctx.t_ns, _drift(rule, ctx))
            else:
                continue  # class / novelty rules: evaluate_class
            if alert is not None:
                fired.append(alert)
        return fired

    def evaluate_class(
        self,
        *,
        source: str,
        seq: int,
        t_ns: int,
        stage: tuple[float, float] | None,
        labels: Sequence[str],
        probabilities: Sequence[float],
        novelty: float | None,
        heatmap: np.ndarray | None,
    ) -> list[Alert]:
        """Evaluate the class and novelty rules on one classified frame; returns those that fired.

        ``labels`` / ``probabilities``: the classifier's classes and their probabilities (0..1),
        in the same order (any subset; a rule whose label is absent does not fire).
        ``novelty``: the frame's novelty score, None without the lens (novelty rules skip).
        ``heatmap``: the uint8 CAM that explains the frame, attached to every alert (or None).
        Cooldowns as for count rules, on the frame time ``t_ns``.
        """
        if len(labels) != len(probabilities):
            raise FrameError(f"{len(labels)} class labels but {len(probabilities)} probabilities")
        prob = {str(k): float(p) for k, p in zip(labels, probabilities, strict=True)}
        fired: list[Alert] = []
        for rule in self.rules:
            if isinstance(rule, ClassRule):
                p = prob.get(rule.label)
                if p is None or not p > rule.threshold:
                    continue
                value = p
                text = (f"class {rule.label} has probability {p:.3f} > {_num(rule.threshold)} "
                        f"(rule {rule.name})")
            elif isinstance(rule, NoveltyRule):
                if novelty is None or not novelty > rule.threshold:
                    continue
                value = float(novelty)
                top = max(prob, key=prob.__getitem__) if prob else None
                text = (f"frame novelty {value:.3g} > {_num(rule.threshold)}"
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
                source=source,
                seq=seq,
                t_ns=int(t_ns),
                stage=stage,
                heatmap=heatmap,
            )
            limited = self._rate_limited(rule, source, int(t_ns), alert)
            if limited is not None:
                fired.append(limited)
        return fired

    # ------------------------------------------------------------------ rule kinds

    def _rate_limited(
        self,
        rule: CountRule | D50DriftRule | ClassRule | NoveltyRule,
        source: str,
        t_ns: int,
        alert: Alert | None,
    ) -> Alert | None:
        if alert is None:
            return None
        key = (rule.name, source)
        last = self._last_fired.get(key)
        # a clock that went backwards (a restarted source) starts a new cooldown
        if last is not None and last <= t_ns < last + round(rule.cooldown_s * 1e9):
            self.suppressed[rule.name] += 1
            return None
        self._last_fired[key] = t_ns
        return alert

    def _particle(self, rule: ParticleRule, ctx: _Frame) -> Alert | None:
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
        for fname, op, value in rule._conditions:
            mask &= _OPS[op](table[fname], value)
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
        stage = np.array(ctx.stage if ctx.stage is not None else (np.nan, np.nan), np.float64)
        new = ~_duplicates(mem, rule.stage_tolerance_um, stage, xy, radius, bbox)
        if not new.any():
            self.suppressed[rule.name] += 1
            return None
        self._remember(rule, ctx.source, ctx.t_ns, stage, xy, radius, bbox)

        primary = next(((f, op, v) for f, op, v in rule._conditions if f != "shape_class"), None)
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
        return Alert(
            rule=rule.name,
            kind=rule.kind,
            severity=rule.severity,
            value=value,
            threshold=threshold,
            explanation=_explain_particles(rule, hits, order, int(new.sum()), ctx.units),
            particles=rows.copy(),
            source=ctx.source,
            seq=ctx.seq,
            t_ns=ctx.t_ns,
            stage=ctx.stage,
        )

    # ------------------------------------------------------------------ de-duplication memory

    def _recall(self, rule: ParticleRule, ctx: _Frame) -> _Memory:
        """The rule's remembered particles for this source, without expired ones."""
        key = (rule.name, ctx.source)
        mem = self._memory.get(key)
        if mem is None:
            mem = self._memory[key] = _Memory()
        age = ctx.t_ns - mem.t_ns
        live = (age >= 0) & (age < round(rule.cooldown_s * 1e9))
        if not live.all():
            mem.t_ns, mem.stage, mem.xy = mem.t_ns[live], mem.stage[live], mem.xy[live]
            mem.radius, mem.bbox = mem.radius[live], mem.bbox[live]
        return mem

    def _remember(
        self,
        rule: ParticleRule,
        source: str,
        t_ns: int,
        stage: np.ndarray,
        xy: np.ndarray,
        radius: np.ndarray,
        bbox: np.ndarray,
    ) -> None:
        mem = self._memory[(rule.name, source)]
        n = len(xy)
        mem.t_ns = np.concatenate([mem.t_ns, np.full(n, t_ns, np.int64)])[-_MAX_REMEMBERED:]
        mem.stage = np.concatenate([mem.stage, np.tile(stage, (n, 1))])[-_MAX_REMEMBERED:]
        mem.xy = np.concatenate([mem.xy, xy])[-_MAX_REMEMBERED:]
        mem.radius = np.concatenate([mem.radius, radius])[-_MAX_REMEMBERED:]
        mem.bbox = np.concatenate([mem.bbox, bbox])[-_MAX_REMEMBERED:]


@dataclass(frozen=True)
class _Frame:
    source: str
    seq: int
    t_ns: int
    stage: tuple[float, float] | None
    table: np.ndarray
    stats: dict[str, Any] | None
    units: str
    pixel_size_nm: float | None


def _scale(ctx: _Frame) -> float | None:
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
) -> np.ndarray:
    """Which particles lie near a remembered one seen at the same stage position."""
    if mem.t_ns.size == 0:
        return np.zeros(len(xy), dtype=bool)
    if np.isnan(stage).any():
        same = np.isnan(mem.stage).any(axis=1)
    else:
        same = (np.abs(mem.stage - stage) <= tolerance_um).all(axis=1)
    if not same.any():
        return np.zeros(len(xy), dtype=bool)
    m_xy, m_r, m_bb = mem.xy[same], mem.radius[same], mem.bbox[same]
    d = np.hypot(xy[:, None, 0] - m_xy[None, :, 0], xy[:, None, 1] - m_xy[None, :, 1])
    r = np.fmax(radius[:, None], m_r[None, :])
    near = d <= r
    # without a pixel size: centroid of one inside the other's bounding box (px, x1/y1 exclusive)
    unknown = np.isnan(r)
    if unknown.any():
        inside = _inside(xy[:, None, :], m_bb[None, :, :])
        inside |= _inside(m_xy[None, :, :], bbox[:, None, :])
        near = np.where(unknown, inside, near)
    return near.any(axis=1)


def _inside(p: np.ndarray, bb: np.ndarray) -> np.ndarray:
    return (
        (p[..., 0] >= bb[..., 0] - 0.5)
        & (p[..., 0] < bb[..., 2] - 0.5)
        & (p[..., 1] >= bb[..., 1] - 0.5)
        & (p[..., 1] < bb[..., 3] - 0.5)
    )


def _count(rule: CountRule, ctx: _Frame) -> Alert | None:
    table = ctx.table
    n = len(table) if rule.include_border else int(np.count_nonzero(~table["border"]))
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
        explanation=f"frame has {n} particles {rel} {_num(threshold)} (rule {rule.name})",
        particles=np.empty(0, PARTICLE_DTYPE),
        source=ctx.source,
        seq=ctx.seq,
        t_ns=ctx.t_ns,
        stage=ctx.stage,
    )


def _drift(rule: D50DriftRule, ctx: _Frame) -> Alert | None:
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
        f"window D50 {_num(drift['window_d50'])} {units} is {abs(change):.1f} % "
        f"{'above' if grow else 'below'} the reference D50 {_num(drift['reference_d50'])} {units} "
        f"(limit {_num(rule.pct)} %, rule {rule.name})"
    )
    return Alert(
        rule=rule.name,
        kind=rule.kind,
        severity=rule.severity,
        value=float(change),
        threshold=float(rule.pct if grow else -rule.pct),
        explanation=text,
        particles=np.empty(0, PARTICLE_DTYPE),
        source=ctx.source,
        seq=ctx.seq,
        t_ns=ctx.t_ns,
        stage=ctx.stage,
    )


def _num(v: float) -> str:
    """A short human number: 63.2, 50, 0.00123, 1234."""
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _unit(fname: str, units: str) -> str:
    if fname.endswith("_nm2"):
        return f" {units}²"
    if fname.endswith("_nm"):
        return f" {units}"
    if fname.endswith("_deg"):
        return "°"
    return ""


def _explain_particles(
    rule: ParticleRule, hits: np.ndarray, order: np.ndarray, n_new: int, units: str
) -> str:
    row = hits[order[0]]
    parts = []
    for fname, op, value in rule._conditions:
        if fname == "shape_class":
            parts.append(f"shape {SHAPE_CLASSES[int(row['shape_class'])]}")
            continue
        u = _unit(fname, units)
        label = _LABELS.get(fname, fname.replace("_", " "))
        parts.append(f"{label} {_num(row[fname])}{u} {_OP_TEXT[op]} {_num(value)}{u}")
    what = (
        f"particle {int(row['id'])} has " + " and ".join(parts)
        if parts
        else (f"particle {int(row['id'])} matches")
    )
    if len(hits) == 1:
        return f"{what} (rule {rule.name})"
    return f"{len(hits)} particles match ({n_new} new); {what} (rule {rule.name})"
