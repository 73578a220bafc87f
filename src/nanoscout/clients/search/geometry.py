"""Where a frame lies on the stage, and tilings of an area into frames. Lengths in µm unless
the name says nm or px.

A frame is centred on its stage position; (col, row) pixel offsets from the frame centre map to
stage offsets through ``image_to_stage`` (identity: columns along +x, rows along +y), in units
of the pixel size — the convention of :mod:`nanoscout.clients.microscope.interfaces`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Area:
    """A rectangle on the stage, µm."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float

    def __post_init__(self) -> None:
        if not (self.x_min < self.x_max and self.y_min < self.y_max):
            raise ValueError(f"empty search area {self}")

    @classmethod
    def parse(cls, text: str) -> Area:
        """``"x_min,x_max,y_min,y_max"`` in µm."""
        try:
            vals = [float(v) for v in text.split(",")]
        except ValueError as exc:
            raise ValueError(f"area {text!r}: expected four numbers x_min,x_max,y_min,y_max "
                             "(µm)") from exc
        if len(vals) != 4:
            raise ValueError(f"area {text!r}: expected four numbers x_min,x_max,y_min,y_max (µm)")
        return cls(*vals)

    @property
    def width(self) -> float:
        """Width along x (µm)."""
        return self.x_max - self.x_min

    @property
    def height(self) -> float:
        """Height along y (µm)."""
        return self.y_max - self.y_min

    def contains(self, x: float, y: float) -> bool:
        """True when (x, y) lies inside the rectangle (edges included)."""
        return self.x_min <= x <= self.x_max and self.y_min <= y <= self.y_max


@dataclass(frozen=True)
class FrameGeometry:
    """One acquired frame on the stage."""

    center_um: tuple[float, float]
    pixel_size_nm: float
    shape: tuple[int, int]  # rows, cols
    image_to_stage: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))

    @property
    def fov_um(self) -> tuple[float, float]:
        """Field of view (x width, y height), µm."""
        return self.shape[1] * self.pixel_size_nm / 1e3, self.shape[0] * self.pixel_size_nm / 1e3

    def to_stage(self, row: np.ndarray | float, col: np.ndarray | float
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Stage (x, y) µm of pixel positions (row, col)."""
        h, w = self.shape
        p = self.pixel_size_nm / 1e3
        dc = (np.asarray(col, np.float64) - (w - 1) / 2.0) * p
        dr = (np.asarray(row, np.float64) - (h - 1) / 2.0) * p
        (a, b), (c, d) = self.image_to_stage
        return self.center_um[0] + a * dc + b * dr, self.center_um[1] + c * dc + d * dr

    def to_pixel(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Pixel (row, col) of a stage position (may lie outside the frame)."""
        h, w = self.shape
        p = self.pixel_size_nm / 1e3
        (a, b), (c, d) = self.image_to_stage
        det = a * d - b * c
        dx, dy = x_um - self.center_um[0], y_um - self.center_um[1]
        dc = (d * dx - b * dy) / det
        dr = (-c * dx + a * dy) / det
        return dr / p + (h - 1) / 2.0, dc / p + (w - 1) / 2.0

    def covers(self, x_um: float, y_um: float, margin_um: float = 0.0) -> bool:
        """True when (x, y) lies inside the frame at least ``margin_um`` from its edges."""
        h, w = self.shape
        row, col = self.to_pixel(x_um, y_um)
        m = margin_um * 1e3 / self.pixel_size_nm
        return bool(m - 0.5 <= row <= h - 0.5 - m and m - 0.5 <= col <= w - 0.5 - m)

    def holds(self, rect: Area) -> bool:
        """True when the rectangle ``rect`` lies wholly inside the frame (its four corners do,
        to within 1 nm: a frame is convex, whatever its rotation on the stage)."""
        return all(self.covers(x, y, margin_um=-1e-3) for x in (rect.x_min, rect.x_max)
                   for y in (rect.y_min, rect.y_max))

    def inside(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Which stage positions (x, y) µm lie inside the frame (edges included): a bool
        array."""
        h, w = self.shape
        p = self.pixel_size_nm / 1e3
        (a, b), (c, d) = self.image_to_stage
        dx, dy = x_um - self.center_um[0], y_um - self.center_um[1]
        det = a * d - b * c
        col = (d * dx - b * dy) / det / p + (w - 1) / 2.0
        row = (-c * dx + a * dy) / det / p + (h - 1) / 2.0
        e = 1e-6  # px: a position on the frame's edge is inside, whatever the rounding
        return (row >= -0.5 - e) & (row <= h - 0.5 + e) & (col >= -0.5 - e) & (col <= w - 0.5 + e)


def tile_centres(area: Area, fov_um: tuple[float, float], overlap_um: float
                 ) -> list[tuple[float, float]]:
    """Frame centres that cover ``area`` with frames of ``fov_um`` overlapping by ``overlap_um``.

    A serpentine raster (rows along x, alternate rows reversed) so the stage never jumps back
    across the area. Tiles are spread evenly: the overlap is at least ``overlap_um``. Every
    object smaller than the overlap lies wholly inside at least one frame.
    """
    fx, fy = fov_um
    if not (fx > overlap_um and fy > overlap_um and overlap_um >= 0):
        raise ValueError(f"overlap {overlap_um!r} µm must be >= 0 and smaller than the field "
                         f"of view {fov_um} µm")

    def axis(lo: float, hi: float, f: float) -> list[float]:
        span = hi - lo
        if span <= f:
            return [0.5 * (lo + hi)]
        n = math.ceil((span - f) / (f - overlap_um)) + 1
        step = (span - f) / (n - 1)
        return [lo + f / 2 + i * step for i in range(n)]

    xs = axis(area.x_min, area.x_max, fx)
    ys = axis(area.y_min, area.y_max, fy)
    out: list[tuple[float, float]] = []
    for j, y in enumerate(ys):
        row = xs if j % 2 == 0 else xs[::-1]
        out.extend((x, y) for x in row)
    return out


def tile_duty(area: Area, centre_um: tuple[float, float], fov_um: tuple[float, float],
              slack_um: float) -> Area:
    """The part of ``area`` that the tile planned at ``centre_um`` with frames of ``fov_um``
    must image: its footprint clipped to the area, less ``slack_um`` on each side that lies
    inside the area (a neighbouring tile overlaps there), none on the area's own edges.

    A frame that holds its tile's duty landed well enough: with ``slack_um`` a quarter of the
    tiling's overlap, two neighbours that both landed still overlap by half of it.
    """
    def axis(c: float, f: float, lo: float, hi: float) -> tuple[float, float]:
        a, b = c - f / 2, c + f / 2
        a = lo if a <= lo + 1e-9 else min(a + slack_um, c)
        b = hi if b >= hi - 1e-9 else max(b - slack_um, c)
        return a, max(b, a + 1e-9)

    x0, x1 = axis(centre_um[0], fov_um[0], area.x_min, area.x_max)
    y0, y1 = axis(centre_um[1], fov_um[1], area.y_min, area.y_max)
    return Area(x0, x1, y0, y1)


class Coverage:
    """What part of a search area analysed frames imaged (frames whose results came back).

    :meth:`holds` is exact (a rectangle inside one frame); :attr:`fraction` is the share of
    the area's cells (at most :data:`COVERAGE_CELLS` a side, at least 20 across a frame)
    that lie wholly inside one frame, the number a search reports: it never counts what was
    not imaged, and it may leave out up to a cell's width along the imaged area's edges.
    """

    def __init__(self, area: Area, fov_um: tuple[float, float]) -> None:
        self.area = area
        cell = min(fov_um) / 20.0
        nx = max(1, min(COVERAGE_CELLS, math.ceil(area.width / cell)))
        ny = max(1, min(COVERAGE_CELLS, math.ceil(area.height / cell)))
        # the cells' corners: a cell counts when all four lie inside one frame
        xs = area.x_min + np.arange(nx + 1) * area.width / nx
        ys = area.y_min + np.arange(ny + 1) * area.height / ny
        self._x, self._y = np.meshgrid(xs, ys)
        self._hit = np.zeros((ny, nx), bool)
        #: the analysed frames, in the order taken
        self.frames: list[FrameGeometry] = []

    def add(self, geom: FrameGeometry) -> None:
        """Count the area ``geom`` imaged (a frame whose results came back)."""
        self.frames.append(geom)
        c = geom.inside(self._x, self._y)
        self._hit |= c[:-1, :-1] & c[:-1, 1:] & c[1:, :-1] & c[1:, 1:]

    def holds(self, rect: Area) -> bool:
        """True when one analysed frame holds the whole of ``rect``."""
        return any(g.holds(rect) for g in self.frames)

    @property
    def fraction(self) -> float:
        """Share of the area that analysed frames imaged, 0..1."""
        return float(self._hit.mean())


#: the most cells a side of :class:`Coverage`'s grid
COVERAGE_CELLS = 1000
