"""Alert rules as configured: needle-in-a-haystack particles, particle counts, D50 drift,
classes, novelty (the models and their parsing; :mod:`nanoscout.analysis.alerts` evaluates them).

Rules come from the configuration as a list of dicts, parsed by :func:`parse_rules` into
frozen pydantic models (a discriminated union on ``kind``)::

    [[alerts]]                                  # a particle that meets every condition
    name = "big-particle"
    kind = "particle"
    severity = "warning"                        # info | warning | critical
    where = { ecd_nm = { gt = 50 } }            # gt/ge/lt/le/eq on numeric particle fields
    # min_count = 1, include_border = false, cooldown_s = 5, dedup_radius_nm = (its ECD)
    min_confidence = 0.8                        # optional: only particles real with
                                                # probability >= 0.8 (calibrated detector)

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
    # count = "expected"                        # or: the expected number of real particles,
                                                # the sum of their confidences (calibrated)

    [[alerts]]                                  # in-situ sintering / growth
    name = "sintering"
    kind = "d50_drift"
    pct = 10                                    # |window D50 / reference D50 - 1| > 10 %
    direction = "both"                          # or "grow" / "shrink"

    [[alerts]]                                  # in-situ: particles coalesced (tracking on)
    name = "coalescence"
    kind = "coalescence"
    min_count = 1                               # merge events on one frame

    [[alerts]]                                  # in-situ: growth faster than a threshold
    name = "fast-growth"
    kind = "growth_rate"
    above = 0.5                                 # median dECD/dt of the tracks, nm/s (px/s
                                                # uncalibrated); or below = -0.5 (shrinking)
    # min_tracks = 5

    [[alerts]]                                  # in-situ: particles vanished (dissolved,
    name = "count-drop"                         # evaporated, left the field)
    kind = "count_drop"
    pct = 20                                    # count < 80 % of the median of the previous
    window_frames = 10                          # 10 frames
    # count = "expected"                        # as for count rules

    [[alerts]]                                  # field-of-view classifier (class.<source>)
    name = "wires"
    kind = "class"
    label = "rods_wires"                        # one of the classifier card's classes
    threshold = 0.9                             # fires when P(label) > threshold

    [[alerts]]                                  # the AI lens: an unusual field of view
    name = "something-new"
    kind = "novelty"
    threshold = 3.0                             # fires when the frame's novelty > threshold

``particle``, ``count``, ``d50_drift``, ``coalescence``, ``growth_rate`` and ``count_drop``
rules are evaluated per frame by
:meth:`AlertEngine.evaluate`; ``class`` and ``novelty`` rules by
:meth:`AlertEngine.evaluate_class` on each classified frame, and their alerts carry the
class activation map that explains them (``Alert.heatmap``: a class rule's label's, a novelty
rule's the top class's). A class rule's label can only be
checked against the classifier's classes once the model is loaded:
:func:`check_class_labels` (called at start-up) raises a :class:`ConfigError` for an unknown
one, and :func:`check_rule_inputs` for a class or novelty rule while the classifier or the AI
lens is switched off (it could never fire).

Several operators on one field, and several fields, must all hold; operators on one field that
no value meets (``{ gt = 50, lt = 10 }``) are a configuration error, as are ``below > above``
on a count or growth-rate rule (it would fire on every frame). ``where = {}`` matches every
particle. The clock is the frame time ``t_ns``, so behaviour is deterministic.

Rate limiting, de-duplication, uncalibrated frames and what ``Alert.value`` /
``Alert.threshold`` hold: :mod:`nanoscout.analysis.alerts`.
The three in-situ rules (``coalescence``, ``growth_rate``, ``count_drop``) need tracking
(``[tracking]``); without it they never fire.

Confidence: a particle's ``score`` is the probability that it is real when the detector's
model card has a ``score_calibration`` (the shipped general detector; the frame is then
*calibrated in confidence*), else a raw score that is no probability (the shipped STEM
detector). ``min_confidence`` on a particle rule and ``count = "expected"`` on a count or
count-drop rule use that probability, so on frames whose scores are raw they do not fire
(logged once per rule and source, counted in ``AlertEngine.skipped_raw_scores``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

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

from nanoscout.wire.errors import ConfigError
from nanoscout.wire.particles import NUMERIC_FIELDS, SHAPE_CLASSES

__all__ = [
    "NUMERIC_FIELDS",
    "OPERATORS",
    "AnyRule",
    "ClassRule",
    "CoalescenceRule",
    "CountBasis",
    "CountDropRule",
    "CountRule",
    "D50DriftRule",
    "GrowthRateRule",
    "NoveltyRule",
    "ParticleRule",
    "Rule",
    "SaveFrames",
    "check_class_labels",
    "check_rule_inputs",
    "check_unique_names",
    "needs_confidence",
    "parse_rules",
]

OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
    "eq": operator.eq,
}


def _empty_range(ops: dict[str, float]) -> bool:
    """True when no number meets every condition of ``ops`` (e.g. ``{gt = 50, lt = 10}``)."""
    if "eq" in ops:
        return not all(OPERATORS[op](ops["eq"], bound) for op, bound in ops.items())
    lo, lo_strict = -math.inf, False
    hi, hi_strict = math.inf, False
    for op, bound in ops.items():
        if op in ("gt", "ge") and (bound > lo or (bound == lo and op == "gt")):
            lo, lo_strict = bound, op == "gt"
        elif op in ("lt", "le") and (bound < hi or (bound == hi and op == "lt")):
            hi, hi_strict = bound, op == "lt"
    return lo > hi or (lo == hi and (lo_strict or hi_strict))


def _check_above_below(above: float | None, below: float | None, what: str) -> None:
    """Refuse ``below > above``: a rule that fires on ``> above`` or ``< below`` would then
    fire on every frame."""
    if above is None and below is None:
        raise ValueError(f"a {what} rule needs 'above' and/or 'below'")
    if above is not None and below is not None and below > above:
        raise ValueError(f"below ({below}) > above ({above}): the rule fires when the value is "
                         "> above or < below, so it would fire on every frame")


class SaveFrames(BaseModel):
    """``save_frames = { before = 2, after = 2 }`` on a rule: when it fires, the daemon writes
    the raw frames of the source around it for review: ``before`` frames before the one that
    fired, that frame, and the ``after`` frames that follow (``[review]`` in the daemon's
    configuration; ``before`` beyond the frames kept there gives what is kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    before: int = Field(0, ge=0, le=256)
    after: int = Field(0, ge=0, le=256)


class _RuleBase(BaseModel):
    # every number of a rule is finite, as ``where``'s conditions are (a count threshold of
    # nan never fired, a pct of inf neither)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1)
    severity: Literal["info", "warning", "critical"] = "warning"
    #: rate limit per rule and source, s (see the module docstring)
    cooldown_s: float = Field(5.0, ge=0)
    #: write the raw frames around each firing for review (the daemon; None: nothing saved)
    save_frames: SaveFrames | None = None


class ParticleRule(_RuleBase):
    """Fires when at least ``min_count`` particles meet every condition of ``where``."""

    kind: Literal["particle"] = "particle"
    where: dict[str, dict[str, Any]]
    min_count: int = Field(1, ge=1)
    include_border: bool = False
    dedup_radius_nm: float | None = Field(None, gt=0)
    stage_tolerance_um: float = Field(0.05, ge=0)
    #: a particle counts only when it is real with at least this probability (its calibrated
    #: ``score``); None: every particle that meets ``where``
    min_confidence: float | None = Field(None, gt=0, le=1)

    _conditions: tuple[tuple[str, str, float], ...] = PrivateAttr(default=())

    @property
    def conditions(self) -> tuple[tuple[str, str, float], ...]:
        """(field, operator, value) of every condition of ``where``, in order."""
        return self._conditions

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
                if op not in OPERATORS:
                    raise ValueError(f"{fname}: unknown operator {op!r}; known: {', '.join(OPERATORS)}")
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
            if fname != "shape_class" and _empty_range(ops):
                raise ValueError(f"{fname}: no value meets {ops!r}: the rule could never fire")
        return where

    def model_post_init(self, context: Any, /) -> None:
        """Compile ``where`` into (field, op, value) conditions, shape classes as indices."""
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


#: what a count-type rule counts: "particles" (each detection 1) or "expected" (the
#: expected number of real particles: the sum of their confidences, a calibrated detector's)
CountBasis = Literal["particles", "expected"]


class CountRule(_RuleBase):
    """Fires when the number of particles in a frame is > ``above`` or < ``below``
    (``count = "expected"``: the sum of their confidences)."""

    kind: Literal["count"] = "count"
    above: float | None = None
    below: float | None = None
    include_border: bool = False
    count: CountBasis = "particles"

    @model_validator(mode="after")
    def _check_bounds(self) -> CountRule:
        _check_above_below(self.above, self.below, "count")
        return self


class D50DriftRule(_RuleBase):
    """Fires when the window D50 differs from the reference D50 by more than ``pct`` percent."""

    kind: Literal["d50_drift"] = "d50_drift"
    pct: float = Field(gt=0)
    direction: Literal["both", "grow", "shrink"] = "both"


class CoalescenceRule(_RuleBase):
    """Fires when the tracker finds at least ``min_count`` coalescences on one frame."""

    kind: Literal["coalescence"] = "coalescence"
    min_count: int = Field(1, ge=1)


class GrowthRateRule(_RuleBase):
    """Fires when the median growth rate dECD/dt of the field's tracks (with at least
    ``min_tracks`` of them) is > ``above`` or < ``below`` (nm/s; px/s uncalibrated)."""

    kind: Literal["growth_rate"] = "growth_rate"
    above: float | None = None
    below: float | None = None
    min_tracks: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _check_bounds(self) -> GrowthRateRule:
        _check_above_below(self.above, self.below, "growth_rate")
        return self


class CountDropRule(_RuleBase):
    """Fires when a frame has fewer than (100 - ``pct``) % of the median particle count of
    the source's previous ``window_frames`` frames (border particles left out; ``count =
    "expected"``: the sums of their confidences)."""

    kind: Literal["count_drop"] = "count_drop"
    pct: float = Field(gt=0, lt=100)
    window_frames: int = Field(10, ge=1, le=10_000)
    count: CountBasis = "particles"


class ClassRule(_RuleBase):
    """Fires when the field-of-view classifier gives ``label`` a probability > ``threshold``."""

    kind: Literal["class"] = "class"
    label: str = Field(min_length=1)
    threshold: float = Field(ge=0, lt=1)


class NoveltyRule(_RuleBase):
    """Fires when the frame's novelty score (the AI lens) is > ``threshold``."""

    kind: Literal["novelty"] = "novelty"
    threshold: float = Field(gt=0)


def needs_confidence(rule: AnyRule) -> bool:
    """True when ``rule`` reads particles' confidences (``min_confidence`` or ``count =
    "expected"``): it cannot be evaluated on raw scores."""
    if isinstance(rule, ParticleRule):
        return rule.min_confidence is not None
    return isinstance(rule, CountRule | CountDropRule) and rule.count == "expected"


AnyRule = (ParticleRule | CountRule | D50DriftRule | CoalescenceRule | GrowthRateRule
           | CountDropRule | ClassRule | NoveltyRule)
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


def check_rule_inputs(rules: Sequence[AnyRule], *, classifier: bool, lens: bool) -> None:
    """Raise :class:`ConfigError` naming every rule that could never fire because what it
    reads is switched off: a class rule without the field-of-view classifier (``classifier``
    False), a novelty rule without the AI lens's novelty score (``lens`` False)."""
    bad = [f"alert rule {r.name!r} ({r.kind}) needs the classifier" for r in rules
           if isinstance(r, ClassRule | NoveltyRule) and not classifier]
    bad += [f"alert rule {r.name!r} (novelty) needs the AI lens's novelty score" for r in rules
            if isinstance(r, NoveltyRule) and classifier and not lens]
    if bad:
        raise ConfigError("; ".join(bad) + ": it could never fire ([classify] enabled = false "
                          "or lens_enabled = false)")


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
    check_unique_names([r.name for r in rules])
    return rules


def _describe(err: Any) -> str:
    loc = list(err["loc"])
    if loc and loc[0] in ("particle", "count", "d50_drift", "coalescence", "growth_rate",
                          "count_drop", "class", "novelty"):
        loc = loc[1:]  # pydantic prefixes the union tag
    return f"{'.'.join(str(p) for p in loc) or 'rule'}: {err['msg']}"


def check_unique_names(names: list[str]) -> None:
    """Raise :class:`ConfigError` when a rule name is used twice."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"alert rule name {name!r} is used twice; names must be unique")
        seen.add(name)
