"""Frame geometry and area tilings of the stage search (nanoscout.clients.search.geometry)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoscout.clients.search.geometry import Area, FrameGeometry, tile_centres

IDENTITY = ((1.0, 0.0), (0.0, 1.0))
#: camera rotated by 30° and flipped (det = -1) with respect to the stage
_C, _S = math.cos(math.radians(30)), math.sin(math.radians(30))
ROT_FLIP = ((_C, _S), (_S, -_C))


@pytest.mark.parametrize("m", [IDENTITY, ROT_FLIP, ((0.0, -1.0), (1.0, 0.0))],
                         ids=["identity", "rotated-flipped", "rot90"])
def test_to_stage_and_to_pixel_are_inverses(m: tuple[tuple[float, float], tuple[float, float]]
                                            ) -> None:
    g = FrameGeometry((12.5, -40.25), 20.0, (48, 64), m)
    rng = np.random.default_rng(1)
    rows, cols = rng.uniform(-10, 60, 50), rng.uniform(-10, 75, 50)
    xs, ys = g.to_stage(rows, cols)
    for r, c, x, y in zip(rows, cols, xs, ys, strict=True):
        r2, c2 = g.to_pixel(float(x), float(y))
        assert r2 == pytest.approx(r, abs=1e-9)
        assert c2 == pytest.approx(c, abs=1e-9)
    # and the other way round
    for x, y in [(12.5, -40.25), (13.0, -40.0), (11.1, -39.3)]:
        r, c = g.to_pixel(x, y)
        x2, y2 = g.to_stage(r, c)
        assert (float(x2), float(y2)) == pytest.approx((x, y), abs=1e-12)


@pytest.mark.parametrize("m", [IDENTITY, ROT_FLIP])
def test_centre_pixel_is_the_stage_position(
        m: tuple[tuple[float, float], tuple[float, float]]) -> None:
    for shape in [(64, 64), (48, 65), (1, 1)]:
        g = FrameGeometry((3.0, -7.0), 50.0, shape, m)
        h, w = shape
        x, y = g.to_stage((h - 1) / 2, (w - 1) / 2)
        assert (float(x), float(y)) == pytest.approx((3.0, -7.0))
        assert g.to_pixel(3.0, -7.0) == pytest.approx(((h - 1) / 2, (w - 1) / 2))


def test_convention_columns_along_x_rows_along_y() -> None:
    cx, cy, p_nm, (h, w) = 100.0, 50.0, 25.0, (40, 60)
    g = FrameGeometry((cx, cy), p_nm, (h, w))
    p = p_nm / 1e3
    for row, col in [(0, 0), (0, w - 1), (h - 1, 0), (17, 42)]:
        x, y = g.to_stage(row, col)
        assert float(x) == pytest.approx(cx + (col - (w - 1) / 2) * p)
        assert float(y) == pytest.approx(cy + (row - (h - 1) / 2) * p)
    # a step of one column moves +x by one pixel size, a row +y
    x0, y0 = g.to_stage(10, 10)
    x1, y1 = g.to_stage(10, 11)
    x2, y2 = g.to_stage(11, 10)
    assert (float(x1 - x0), float(y1 - y0)) == pytest.approx((p, 0.0))
    assert (float(x2 - x0), float(y2 - y0)) == pytest.approx((0.0, p))


def test_fov_um_is_width_then_height() -> None:
    g = FrameGeometry((0.0, 0.0), 20.0, (256, 512))
    assert g.fov_um == pytest.approx((10.24, 5.12))


def test_covers_with_and_without_margin() -> None:
    # 100 px × 100 nm = 10 µm square centred on (0, 0): x, y in [-5, 5]
    g = FrameGeometry((0.0, 0.0), 100.0, (100, 100))
    assert g.covers(0.0, 0.0)
    assert g.covers(4.9, -4.9)
    assert g.covers(4.99, 4.99)
    assert not g.covers(5.01, 0.0)
    assert not g.covers(0.0, -5.01)
    assert g.covers(2.9, 0.0, margin_um=2.0)
    assert not g.covers(3.1, 0.0, margin_um=2.0)
    assert not g.covers(0.0, -3.1, margin_um=2.0)
    assert g.covers(-2.9, 2.9, margin_um=2.0)
    # a rotated camera: the covered square turns with it
    r45 = ((math.sqrt(0.5), -math.sqrt(0.5)), (math.sqrt(0.5), math.sqrt(0.5)))
    gr = FrameGeometry((0.0, 0.0), 100.0, (100, 100), r45)
    assert gr.covers(6.5, 0.0)  # along the diagonal of the image (reach 7.07 µm)
    assert not gr.covers(4.9, 4.9)  # a corner of the axis-aligned square is outside


# ------------------------------------------------------------------------------ tilings


def _tile_bounds(c: tuple[float, float], fov: tuple[float, float]
                 ) -> tuple[float, float, float, float]:
    return c[0] - fov[0] / 2, c[0] + fov[0] / 2, c[1] - fov[1] / 2, c[1] + fov[1] / 2


@pytest.mark.parametrize("area,fov,overlap", [
    (Area(0.0, 40.0, 0.0, 40.0), (6.4, 6.4), 3.0),
    (Area(-17.0, 23.5, 5.0, 19.0), (5.12, 3.0), 0.5),
    (Area(0.0, 10.0, 0.0, 100.0), (10.0, 7.0), 0.0),
])
def test_tiles_cover_the_area_and_overlap(area: Area, fov: tuple[float, float],
                                          overlap: float) -> None:
    tiles = tile_centres(area, fov, overlap)
    bounds = np.array([_tile_bounds(c, fov) for c in tiles])
    eps = 1e-9
    gx, gy = np.meshgrid(np.linspace(area.x_min, area.x_max, 97),
                         np.linspace(area.y_min, area.y_max, 101))
    px, py = gx.ravel()[:, None], gy.ravel()[:, None]
    inside = ((bounds[:, 0] - eps <= px) & (px <= bounds[:, 1] + eps)
              & (bounds[:, 2] - eps <= py) & (py <= bounds[:, 3] + eps))
    assert inside.any(axis=1).all(), "some point of the area lies in no tile"
    # tiles never reach beyond the area (the span is larger than a frame here, on x at least)
    assert bounds[:, 0].min() == pytest.approx(area.x_min)
    assert bounds[:, 1].max() == pytest.approx(area.x_max)
    # adjacent tiles overlap by at least overlap_um
    xs, ys = sorted({round(c[0], 9) for c in tiles}), sorted({round(c[1], 9) for c in tiles})
    assert len(xs) * len(ys) == len(tiles)
    for a, b in zip(xs, xs[1:]):
        assert fov[0] - (b - a) >= overlap - 1e-9
    for a, b in zip(ys, ys[1:]):
        assert fov[1] - (b - a) >= overlap - 1e-9


def test_tiles_are_a_serpentine() -> None:
    area, fov = Area(0.0, 30.0, 0.0, 20.0), (6.0, 6.0)
    tiles = tile_centres(area, fov, 1.0)
    xs = sorted({c[0] for c in tiles})
    ys = sorted({c[1] for c in tiles})
    dx, dy = xs[1] - xs[0], ys[1] - ys[0]
    for a, b in zip(tiles, tiles[1:]):
        # consecutive tiles are neighbours: one step along x, or one step along y at a row end
        step = (abs(b[0] - a[0]), abs(b[1] - a[1]))
        assert step == pytest.approx((dx, 0.0)) or step == pytest.approx((0.0, dy)), (a, b)
    # rows run along x, alternate rows reversed
    assert tiles[0] == pytest.approx((xs[0], ys[0]))
    assert tiles[len(xs) - 1] == pytest.approx((xs[-1], ys[0]))
    assert tiles[len(xs)] == pytest.approx((xs[-1], ys[1]))


def test_one_tile_when_the_area_fits_in_a_frame() -> None:
    assert tile_centres(Area(0.0, 4.0, -2.0, 1.0), (5.0, 5.0), 1.0) == [(2.0, -0.5)]
    # exactly one field of view wide is still one tile
    assert tile_centres(Area(0.0, 5.0, 0.0, 5.0), (5.0, 5.0), 1.0) == [(2.5, 2.5)]
    # one axis fits, the other does not
    tiles = tile_centres(Area(0.0, 4.0, 0.0, 20.0), (5.0, 5.0), 1.0)
    assert {c[0] for c in tiles} == {2.0}
    assert len(tiles) > 1


@pytest.mark.parametrize("overlap", [5.0, 6.0, -0.1])
def test_bad_overlap_is_refused(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_centres(Area(0.0, 40.0, 0.0, 40.0), (5.0, 8.0), overlap)


# ------------------------------------------------------------------------------ Area


def test_area_parse() -> None:
    a = Area.parse("-100,100, -50.5,50")
    assert a == Area(-100.0, 100.0, -50.5, 50.0)
    assert (a.width, a.height) == (200.0, 100.5)
    assert a.contains(-100.0, 50.0) and a.contains(0.0, 0.0)
    assert not a.contains(100.1, 0.0)


@pytest.mark.parametrize("text,match", [
    ("1,2,3", "four numbers"),
    ("1,2,3,4,5", "four numbers"),
    ("a,b,c,d", "four numbers"),
    ("", "four numbers"),
    ("5,1,0,1", "empty search area"),
    ("0,1,2,2", "empty search area"),
])
def test_area_parse_refuses(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Area.parse(text)
