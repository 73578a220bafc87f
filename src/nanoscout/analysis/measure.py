"""Per-particle measurement of an instance-label map (ImageJ / ISO 9276-6 conventions).

:func:`measure` turns an integer label map (0 = background, one id per particle) into a
:data:`~nanoscout.wire.particles.PARTICLE_DTYPE` table. It makes one pass over the image to find the
horizontal runs of equal labels; everything after that is vectorised over all runs of all
particles at once (no per-particle Python loop), so the cost is one image pass plus a term
proportional to the number of particle rows, plus one comparison of the map with itself
shifted diagonally for the perimeter. On the shared 2-core dev machine a 1024x1024 detector
label map with ~700 particles of ~16 px took 3.6-5 ms (median; the earlier per-particle hull
code took 21-25 ms in the same runs); the diagonal pass of the Crofton perimeter about doubles
that (1000 disks of 16 px: median CPU 7.7 / 8.3 ms before, 10.8 / 13.5 ms after, two
alternating runs; ``diagonal_share`` 0.49-0.53). ``python benchmarks/measure.py`` times it on
300, 700 and 1000 disks.

Conventions (lengths in nm when ``pixel_size_nm`` is given, else in px; areas squared):

* **Coordinates**: the centre of pixel (row r, column c) is (x = c, y = r); a pixel covers
  [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5]. ``bbox`` is (x0, y0, x1, y1) in px, x1/y1 exclusive.
* **area**: pixel count. **ECD** = 2·sqrt(area/π).
* **Convex hull**: of the pixel *corners* (as ImageJ does for traced outlines), so a single
  pixel has hull area 1, Feret max √2 and Feret min 1, and an axis-aligned rectangle of w x h
  pixels has Feret max sqrt(w² + h²); a digital disk of diameter d has Feret max ≈ d + 1.1 to
  1.4 px. **solidity** = area / hull area (≤ 1).
* **Feret max** = largest distance between two hull vertices; **Feret min** = smallest caliper
  width, i.e. the minimum over hull edges of the largest distance of a vertex from that edge's
  line (rotating calipers: the minimum width of a convex polygon is attained parallel to an edge).
* **Fitted ellipse** (ImageJ ``EllipseFitter``): the central second moments of the pixel set,
  each pixel counted as a unit square (so 1/12 is added to the xx and yy variances). With the
  eigenvalues λ1 ≥ λ2 of that covariance, the axis ratio is sqrt(λ1/λ2) and the axes are scaled
  so that the ellipse has the particle's area:
  ``major = sqrt(4·area/π · sqrt(λ1/λ2))``, ``minor = sqrt(4·area/π · sqrt(λ2/λ1))``
  (so π·major·minor/4 = area; for a true ellipse with semi-axes a ≥ b this gives 2a and 2b).
* **aspect_ratio** = major/minor ≥ 1; **roundness** = 4·area/(π·major²) = minor/major.
* **orientation_deg**: angle of the major axis, degrees counter-clockwise from +x *as displayed*
  (image rows grow downwards, so the y axis is flipped as ImageJ does), in (-90, 90].
* **Perimeter** (for circularity): the Crofton estimate in 4 directions, as
  ``skimage.measure.perimeter_crofton`` (and regionprops' ``perimeter_crofton``) computes it:
  ``π/8 · (I0 + I90 + (I45 + I135)/√2)`` with Iθ the number of pixel pairs along direction θ
  (neighbours in a row, a column, a diagonal) of which exactly one belongs to the particle.
  Averaged over orientations it is unbiased for any shape (Cauchy-Crofton), so **circularity**
  = 4π·area/perimeter², clipped to ≤ 1, is 0.99-1.00 for digital disks of 10-500 px and, over
  random orientations, within 1-2 % of the true value for squares, 5:1 rectangles and
  triangles of 100-300 px (one orientation: -5 to +11 %); below about 40 px it reads polygons
  high (squares and triangles +4 % at 30 px, +7.5 % at 20 px, +6-12 % at 10 px; an
  axis-aligned square 0.887 for π/4). The marching-squares contour used before (ImageJ-like,
  8 directions) was 5.5 % too long on every disk, so a disk of any size read 0.90 and shapes
  of 30-300 px 6-10 % low. Outlines of holes are included.
* **border**: the particle has a pixel in the first/last row or column. On the detector's
  labels this includes whole particles whose outline lies within about 1.4 working-scale px
  of the frame's edge (the network's outline is that coarse there), about 1.4 / scale frame
  px: at factor 1 (24 px particles) 10 of 15 lying 0-1.5 px from the edge were flagged and
  none of 12 at 2-5 px; at x0.11 (200 px particles, a 4096² frame) 26 of 27 at 0-12 px and
  none of 12 at 20-50 px. They are left out of the size statistics like cut ones.
* **shape_class**: see :func:`classify_shapes` (a fixed rule on scale-free descriptors).

Labels may have gaps (absent ids are skipped; a row's ``id`` is the label value) and a label
need not be connected (its pixels are measured together).

Method (all of it exact: no sampled directions, no approximation beyond float64 rounding)
-------------------------------------------------------------------------------------------
* **Runs**: a run is a maximal horizontal stretch of one label in one row. Runs are sorted by
  label (stably, so by row and column inside a particle).
* **Moments** are closed-form sums over each run's columns (Σu, Σu²), taken relative to the
  particle's first run so that no large numbers cancel.
* **Perimeter**: I0 is 2 per run. I90, the pairs between two rows, follows from the
  membership of the 8 pixels diagonally/vertically next to the two run ends: the symmetric
  difference of the particle's pixels in two adjacent rows changes only at run ends.
  I45 and I135 are counted on the (zero-padded) label map by comparing it with itself shifted
  one row and one column (one image pass each, both labels of a differing pair counted). The
  result equals ``skimage.measure.regionprops(...).perimeter_crofton`` to rounding.
* **Convex hull**: the hull of all pixel corners is the hull of the outer corners of each row's
  leftmost and rightmost pixels. Of those staircase corners only the ones that stick out (left
  of the rows above/below on the left side, right of them on the right side) can be vertices.
  The left chain (top to bottom) and right chain (bottom to top) of every particle are then
  pruned in parallel: every point that is not a strictly convex turn between its current
  neighbours is dropped, and its neighbours are retested, until nothing changes. A dropped point
  lies on or inside the segment joining two chain points, hence inside the hull; what remains is
  convex with the chain ends (always hull vertices) fixed, hence the hull. Integer arithmetic.
* **Feret**: rotating calipers. Starting at the top-left vertex, the edge angles of each hull
  increase monotonically through one turn, so the vertex antipodal to every edge is found for
  all polygons at once by one binary search of (edge angle + π) among the edge angles (a tie
  means two parallel edges; both candidates of a tie are evaluated). Feret min = min over edges
  of the antipodal vertex's distance from the edge line; Feret max = max over edges of the
  distance from the edge's start vertex to its antipodal vertex (every antipodal vertex pair
  that can be a diameter is met this way).
"""

from __future__ import annotations

import math

import numpy as np

from nanoscout.wire.errors import FrameError, Reason
from nanoscout.wire.particles import SHAPE_CLASSES, empty_table

__all__ = ["classify_shapes", "measure"]


# Hull pruning rounds after the first full pass retest only the neighbours of removed points.
# A locally convex arc hidden behind a far protrusion loses one point per round; chains still
# changing after this many rounds are finished one by one by a sequential monotone-chain scan.
_MAX_PRUNE_ROUNDS = 32

# Polygons per binary search in _polygon_measures: keys are edge angle + 8·(polygon index within
# the block), and keeping them below 8·4096 leaves float64 enough resolution to order the edge
# directions of polygons up to 65536 px across.
_SEARCH_BLOCK = 4096

# shape-class rule (see classify_shapes); tuned on synthetic truth with
# `python -m nanoscout.training.evaluate_shapes`
MIN_CLASSIFIED_AREA_PX = 20.0
#: the pixel-corner hull exceeds a digitised shape by about this many px per px of perimeter
HULL_EXCESS_PX = 0.2
#: and each Feret diameter by about one pixel
FERET_EXCESS_PX = 1.0
AGGLOMERATE_SOLIDITY = 0.78
IRREGULAR_SOLIDITY = 0.85
AGGLOMERATE_MIN_ASPECT_RATIO = 1.3
ROD_ASPECT_RATIO = 2.0
ROD_MIN_CONVEXITY = 0.90
ROD_MIN_BOX_FILL = 0.80
PLATE_MAX_ASPECT_RATIO = 1.5
PLATE_MAX_BOX_FILL = 0.70
SPHERE_MIN_ELLIPSE_FILL = 0.76

_CLASS = {name: i for i, name in enumerate(SHAPE_CLASSES)}


def measure(
    labels: np.ndarray, pixel_size_nm: float | None, scores: np.ndarray | None = None
) -> np.ndarray:
    """Measure every particle of an instance-label map.

    ``labels``: integer (H, W) map, 0 = background, any positive ids (gaps allowed).
    ``pixel_size_nm``: nm per pixel, or None for an uncalibrated frame (then lengths are px).
    ``scores[k]``: confidence of label k (index 0 unused); None gives 1.0 for every particle.

    Returns a :data:`PARTICLE_DTYPE` table, one row per present id sorted by id; lengths in nm
    (px when uncalibrated), areas in nm² (px²), angles in degrees. Raises :class:`FrameError`
    naming the offending shape, dtype or value.
    """
    labels = _check_labels(labels)
    scale = _check_pixel_size(pixel_size_nm)
    h, w = labels.shape
    flat = labels.ravel()
    start, end, run_lab = _foreground_runs(flat, w)
    if start.size == 0:
        if scores is not None:
            _check_scores(scores, 0)
        return empty_table()
    lmax = int(run_lab.max())
    if lmax > np.iinfo(np.uint32).max:
        raise FrameError(
            f"labels must fit the uint32 particle id, found label {lmax}", reason=Reason.BAD_INPUT
        )
    row, a = np.divmod(start, w)
    b = end - row * w  # one past the run's last column
    # these gathers touch the image around every run end: cheapest in raster order
    per_run = _row_transitions(flat, h, w, start, end, row, a, b, run_lab)

    # a stable sort keeps raster order inside each particle: rows ascending, columns ascending
    order = np.argsort(run_lab.astype(np.uint16) if lmax < 65536 else run_lab, kind="stable")
    row, a, b, run_lab, per_run = row[order], a[order], b[order], run_lab[order], per_run[order]
    nr = row.size
    new_p = np.empty(nr, dtype=bool)
    new_p[0] = True
    np.not_equal(run_lab[1:], run_lab[:-1], out=new_p[1:])
    p_first = np.flatnonzero(new_p)
    ids = run_lab[p_first].astype(np.int64)
    n = ids.size
    n_runs = np.diff(p_first, append=nr)

    diagonal = _diagonal_transitions(labels, ids)
    # Crofton (see the module docstring): I0 = 2 per run, I90 from the runs, I45 + I135
    perimeter = (math.pi / 8.0) * (
        2.0 * n_runs + np.add.reduceat(per_run, p_first) + diagonal / math.sqrt(2.0)
    )
    area, mx, my, vxx, vyy, vxy = _moments(row, a, b, p_first, n_runs)
    x0 = np.minimum.reduceat(a, p_first)
    x1 = np.maximum.reduceat(b, p_first)
    y0 = row[p_first]
    y1 = row[p_first + n_runs - 1] + 1

    # rows of a particle: the first run of a row has its leftmost pixel, the last its rightmost
    new_g = new_p.copy()
    new_g[1:] |= row[1:] != row[:-1]
    g_first = np.flatnonzero(new_g)
    g_last = np.empty_like(g_first)
    g_last[:-1] = g_first[1:] - 1
    g_last[-1] = nr - 1
    hull_area, feret_max, feret_min = _hull_measures(
        np.searchsorted(g_first, p_first), row[g_first], a[g_first], b[g_last], n
    )

    # fitted ellipse (ImageJ EllipseFitter semantics, see module docstring)
    half_trace = 0.5 * (vxx + vyy)
    disc = np.sqrt(np.maximum(0.25 * (vxx - vyy) ** 2 + vxy**2, 0.0))
    lam1 = half_trace + disc
    lam2 = np.maximum(half_trace - disc, 1e-12)
    ratio = np.sqrt(lam1 / lam2)
    base = 4.0 * area / math.pi
    major = np.sqrt(base * ratio)
    minor = np.sqrt(base / ratio)
    # y flipped so that angles are counter-clockwise on screen
    orientation = 0.5 * np.degrees(np.arctan2(-2.0 * vxy, vxx - vyy)) + 0.0
    orientation[orientation <= -90.0] += 180.0

    circularity = np.minimum(4.0 * math.pi * area / perimeter**2, 1.0)
    solidity = np.minimum(area / hull_area, 1.0)
    roundness = 4.0 * area / (math.pi * major**2)

    table = empty_table(n)
    table["id"] = ids
    table["x"] = mx
    table["y"] = my
    table["bbox"] = np.stack([x0, y0, x1, y1], axis=1)
    table["area_nm2"] = area * scale**2
    table["ecd_nm"] = 2.0 * np.sqrt(area / math.pi) * scale
    table["feret_max_nm"] = feret_max * scale
    table["feret_min_nm"] = feret_min * scale
    table["major_nm"] = major * scale
    table["minor_nm"] = minor * scale
    table["orientation_deg"] = orientation
    # float32 rounds -89.9999999999 (a vertical axis with rounding noise in vxy) to -90
    angle = table["orientation_deg"]
    angle[angle <= -90.0] += 180.0
    table["aspect_ratio"] = ratio
    table["roundness"] = roundness
    table["circularity"] = circularity
    table["solidity"] = solidity
    if scores is None:
        table["score"] = 1.0
    else:
        table["score"] = _check_scores(scores, lmax)[ids]
    table["border"] = (x0 == 0) | (y0 == 0) | (x1 == w) | (y1 == h)
    table["shape_class"] = classify_shapes(area, ratio, solidity, feret_max, feret_min)
    return table


def classify_shapes(
    area_px: np.ndarray,
    aspect_ratio: np.ndarray,
    solidity: np.ndarray,
    feret_max_px: np.ndarray,
    feret_min_px: np.ndarray,
) -> np.ndarray:
    """Return the index into SHAPE_CLASSES of each particle by a fixed, documented rule (uint8).

    Inputs are per-particle arrays in pixels (area px², Feret px); every descriptor is
    scale-free. Pixelisation bias is removed first, so that a 10 px disk looks like a 40 px one:
    the pixel-corner hull (see the module docstring) is larger than the shape by about
    ``HULL_EXCESS_PX`` (0.2) px times its perimeter (π x mean Feret), each Feret diameter by about
    ``FERET_EXCESS_PX`` (1) px. With A the area, F and f the corrected Feret max and min:

    * ``convexity``   = A / (hull area - 0.2·π·(Feret max + Feret min)/2), ≤ 1: solidity
      without the pixel bias (convex shapes ≈ 0.95-1, two touching disks ≈ 0.7-0.8);
    * ``box_fill``    = A / (F·f): triangle 0.5, square 0.71, hexagon 0.75, disk and every
      ellipse 0.785, capsule and rectangle 0.89-1 (the triangle is the least for given F, f);
    * ``ellipse_fill`` = A / F² · aspect ratio: disk and every ellipse 0.785; square 0.5,
      pentagon 0.66, hexagon 0.65, octagon 0.71 (polygons have corners reaching out).

    In order of precedence:

    1. area < 20 px²                                          → ``unclassified``
    2. convexity < 0.78                                       → ``agglomerate`` (deep necks)
    3. convexity < 0.85 and aspect ratio ≥ 1.3                → ``agglomerate`` (two lobes)
    4. convexity < 0.85                                       → ``irregular`` (concave, compact)
    5. aspect ratio ≥ 2, convexity < 0.90 and box_fill < 0.80 → ``agglomerate`` (a chain:
       two touching disks have convexity 0.88 and box_fill 0.785; a capsule 1 and ≥ 0.89)
    6. aspect ratio ≥ 2                                       → ``rod``
    7. aspect ratio < 1.5 and box_fill < 0.70                 → ``plate`` (triangular outline)
    8. ellipse_fill ≥ 0.76                                    → ``sphere`` (smooth, no corners;
       an elongated spheroid (aspect ratio < 2) is a ``sphere`` too, its elongation is in
       ``aspect_ratio``)
    9. otherwise (convex, with corners)                       → ``faceted``

    Measured on exact synthetic truth at 10, 20 and 40 px median ECD
    (``python -m nanoscout.training.evaluate_shapes --seed 7``, held out): 95 % of particles get
    their expected class (75 % on the shipped detector's instances, whose outlines are rounder);
    octagons and hexagons below ~15 px pass for spheres, and small triangles with rounded pixel
    corners for faceted. A projected plate is only recognised by its triangular outline (hexagonal
    plates are ``faceted``; a thin plate's contrast is not used).
    """
    area = np.asarray(area_px, dtype=np.float64)
    ar = np.asarray(aspect_ratio, dtype=np.float64)
    fmax = np.asarray(feret_max_px, dtype=np.float64)
    fmin = np.asarray(feret_min_px, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        hull = area / np.maximum(np.asarray(solidity, dtype=np.float64), 1e-9)
        hull_c = hull - HULL_EXCESS_PX * math.pi * 0.5 * (fmax + fmin)
        convexity = np.minimum(area / np.maximum(hull_c, area * 1e-3), 1.0)
        big = np.maximum(fmax - FERET_EXCESS_PX, 1.0)
        small = np.maximum(fmin - FERET_EXCESS_PX, 1.0)
        box_fill = area / (big * small)
        ellipse_fill = area / (big * big) * ar
    cls = np.full(area.shape, _CLASS["faceted"], dtype=np.uint8)
    cls[ellipse_fill >= SPHERE_MIN_ELLIPSE_FILL] = _CLASS["sphere"]
    cls[(ar < PLATE_MAX_ASPECT_RATIO) & (box_fill < PLATE_MAX_BOX_FILL)] = _CLASS["plate"]
    long = ar >= ROD_ASPECT_RATIO
    cls[long] = _CLASS["rod"]
    cls[long & (convexity < ROD_MIN_CONVEXITY) & (box_fill < ROD_MIN_BOX_FILL)] = (
        _CLASS["agglomerate"]
    )
    concave = convexity < IRREGULAR_SOLIDITY
    cls[concave] = _CLASS["irregular"]
    cls[concave & (ar >= AGGLOMERATE_MIN_ASPECT_RATIO)] = _CLASS["agglomerate"]
    cls[convexity < AGGLOMERATE_SOLIDITY] = _CLASS["agglomerate"]
    cls[area < MIN_CLASSIFIED_AREA_PX] = _CLASS["unclassified"]
    return cls


# --------------------------------------------------------------------------- checks


def _check_labels(labels: object) -> np.ndarray:
    if not isinstance(labels, np.ndarray):
        raise FrameError(
            f"labels must be a numpy array, got {type(labels).__name__}", reason=Reason.BAD_INPUT
        )
    if labels.ndim != 2:
        raise FrameError(
            f"labels must be a 2-D (H, W) array, got shape {labels.shape}", reason=Reason.BAD_INPUT
        )
    if labels.dtype.kind not in "iu":
        raise FrameError(f"labels must have an integer dtype, got {labels.dtype}", reason=Reason.BAD_INPUT)
    if labels.dtype.byteorder == ">" or not labels.flags.c_contiguous:
        labels = np.ascontiguousarray(labels, dtype=labels.dtype.newbyteorder("="))
    return labels


def _check_pixel_size(pixel_size_nm: float | None) -> float:
    if pixel_size_nm is None:
        return 1.0
    s = float(pixel_size_nm)
    if not math.isfinite(s) or s <= 0.0:
        raise FrameError(
            f"pixel_size_nm must be a finite number > 0 or None, got {pixel_size_nm!r}",
            reason=Reason.CALIBRATION,
        )
    return s


def _check_scores(scores: object, max_label: int) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 1 or arr.shape[0] <= max_label or arr.dtype.kind not in "fiub":
        raise FrameError(
            f"scores must be a 1-D numeric array indexed by label (length > {max_label}), "
            f"got shape {arr.shape} dtype {arr.dtype}",
            reason=Reason.BAD_INPUT,
        )
    return arr


# --------------------------------------------------------------------------- geometry


def _foreground_runs(flat: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal non-zero labels in raster order: (first flat index, end index, label).

    A run is a maximal stretch of one label inside one row; ``end`` is one past its last pixel.
    Raises :class:`FrameError` for a negative label.
    """
    n = flat.size
    if n == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, flat[:0]
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    np.not_equal(flat[1:], flat[:-1], out=is_start[1:])
    is_start[::w] = True
    start = np.flatnonzero(is_start)
    lab = flat[start]
    lmin = lab.min()
    if lmin < 0:
        raise FrameError(f"labels must be >= 0, found label {int(lmin)}", reason=Reason.BAD_INPUT)
    end = np.empty_like(start)
    end[:-1] = start[1:]
    end[-1] = n
    fg = np.flatnonzero(lab)
    return start[fg], end[fg], lab[fg]


def _row_transitions(
    flat: np.ndarray,
    h: int,
    w: int,
    start: np.ndarray,
    end: np.ndarray,
    row: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    lab: np.ndarray,
) -> np.ndarray:
    """Each run's share of its particle's vertical transitions I90 (pixel pairs in a column
    of which exactly one belongs to the particle; the sum over a particle's runs is its I90).

    For a run from column a to b (exclusive) in row r, m0..m3 say whether pixels (r-1, a-1),
    (r-1, a), (r+1, a-1), (r+1, a) belong to the run's particle and m4..m7 the same for columns
    b-1 and b. The transitions between row r and the rows above and below number
    sum(a·(m0 + m1 + m2 + m3 - 2) + b·(2 - m4 - m5 - m6 - m7)) over the runs: the symmetric
    difference of two rows starts or ends only at run ends.
    """
    idx = np.empty((8, start.size), dtype=np.int64)
    idx[0:4] = start
    idx[4:8] = end
    idx += np.array([-w - 1, -w, w - 1, w, -w - 1, -w, w - 1, w])[:, None]
    m = np.take(flat, idx, mode="clip") == lab
    # pixels outside the image belong to no particle; only runs on the image edge have any
    edge = np.flatnonzero((row == 0) | (row == h - 1) | (a == 0) | (b == w))
    if edge.size:
        up = row[edge] > 0
        dn = row[edge] < h - 1
        lt = a[edge] > 0
        rt = b[edge] < w
        m[:, edge] &= np.stack([up & lt, up, dn & lt, dn, up, up & rt, dn, dn & rt])
    s = m.view(np.int8).reshape(2, 4, -1).sum(axis=1, dtype=np.int64)
    return a * (s[0] - 2) + b * (2 - s[1])


def _diagonal_transitions(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """I45 + I135 of each particle in ``ids`` (sorted): the number of diagonally adjacent pixel
    pairs, outside-the-image pixels included, of which exactly one has the particle's label.

    The map is copied with a zero row above and below and a zero column on the right, after
    one leading zero (the top-left pixel's up-left neighbour), so that in the flat copy the
    down-right and down-left neighbours are a fixed shift away and pairs that wrap around a row
    end meet that zero column (background on both sides or a true transition to outside).
    Cost: two comparisons of the whole map plus work in proportion to the boundary pixels.
    """
    h, w = labels.shape
    w2 = w + 1
    f = np.zeros((h + 2) * w2 + 1, dtype=labels.dtype)
    f[1:].reshape(h + 2, w2)[1:-1, :w] = labels
    found = []
    for shift in (w2 + 1, w2 - 1):
        at = np.flatnonzero(f[:-shift] != f[shift:])
        found += [f[at], f[at + shift]]
    lab = np.concatenate(found)
    lab = lab[lab != 0]
    return np.bincount(np.searchsorted(ids, lab), minlength=ids.size).astype(np.float64)


def _moments(
    row: np.ndarray, a: np.ndarray, b: np.ndarray, p_first: np.ndarray, n_runs: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Area (px²), centroid x, y (px) and central moments xx, yy, xy (px²) of each particle.

    Runs are grouped by particle (``p_first`` = first run, ``n_runs`` = count); each pixel is a
    unit square, so 1/12 is added to the xx and yy variances. Sums are taken relative to the
    particle's first run, so they stay small and nothing cancels.
    """
    a0 = np.repeat(a[p_first], n_runs)
    length = (b - a).astype(np.float64)
    mean_u = (a + b - 1 - 2 * a0) * 0.5  # mean column of the run, relative
    v = (row - np.repeat(row[p_first], n_runs)).astype(np.float64)
    su = mean_u * length  # Σu over the run
    suu = su * mean_u + (length * length - 1.0) * length / 12.0  # Σu²
    vl = v * length
    area = np.add.reduceat(length, p_first)
    ox = np.add.reduceat(su, p_first) / area
    oy = np.add.reduceat(vl, p_first) / area
    vxx = np.add.reduceat(suu, p_first) / area - ox * ox + 1.0 / 12.0
    vyy = np.add.reduceat(v * vl, p_first) / area - oy * oy + 1.0 / 12.0
    vxy = np.add.reduceat(v * su, p_first) / area - ox * oy
    return area, a[p_first] + ox, row[p_first] + oy, vxx, vyy, vxy


def _hull_measures(
    gp_first: np.ndarray, gr: np.ndarray, gl: np.ndarray, grt: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hull area (px²), Feret max and Feret min (px) of the pixel-corner convex hull.

    Input is one entry per (particle, row), grouped by particle and sorted by row: ``gr`` the
    row, ``gl`` its leftmost and ``grt`` one past its rightmost column (corner coordinates in a
    frame where pixel (r, c) covers [c, c+1) x [r, r+1); only differences matter), and
    ``gp_first`` the first entry of each particle.
    """
    g = gr.size
    first = np.zeros(g, dtype=bool)
    first[gp_first] = True
    cont = (gr[1:] == gr[:-1] + 1) & ~first[1:]  # entry k+1 is the row below entry k
    # (top, bottom) corner of each row's ends; where rows touch, a corner can be a hull vertex
    # only if it sticks out beyond the neighbouring row's corner at the same height
    lk = np.ones((g, 2), dtype=bool)
    rk = np.ones((g, 2), dtype=bool)
    lk[1:, 0] = ~cont | (gl[1:] < gl[:-1])
    lk[:-1, 1] = ~cont | (gl[:-1] < gl[1:])
    rk[1:, 0] = ~cont | (grt[1:] > grt[:-1])
    rk[:-1, 1] = ~cont | (grt[:-1] > grt[1:])
    ends = np.empty((g, 2), dtype=bool)
    ends[:, 0] = first
    ends[:-1, 1] = first[1:]
    ends[-1, 1] = True
    end_flat = ends.ravel()
    # left chains top to bottom for particles 0..n-1, then right chains bottom to top for
    # particles n-1..0: every chain then runs the way its particle's hull is traversed
    li = np.flatnonzero(lk)
    ri = np.flatnonzero(rk)[::-1]
    x = np.concatenate([gl[li >> 1], grt[ri >> 1]])
    y = np.concatenate([gr[li >> 1] + (li & 1), gr[ri >> 1] + (ri & 1)])
    fixed = np.concatenate([end_flat[li], end_flat[ri]])
    x, y, fixed = _prune(x, y, fixed)

    # hull of particle p = its left chain followed by its right chain
    fpos = np.flatnonzero(fixed)
    chain_start = fpos[0::2]
    chain_len = fpos[1::2] - chain_start + 1
    seg_start = np.empty(2 * n, dtype=np.int64)
    seg_len = np.empty(2 * n, dtype=np.int64)
    seg_start[0::2] = chain_start[:n]
    seg_start[1::2] = chain_start[n:][::-1]
    seg_len[0::2] = chain_len[:n]
    seg_len[1::2] = chain_len[n:][::-1]
    seg_out = np.cumsum(seg_len) - seg_len
    idx = np.repeat(seg_start - seg_out, seg_len) + np.arange(x.size)
    return _polygon_measures(x[idx], y[idx], seg_out[0::2], n)


def _prune(
    x: np.ndarray, y: np.ndarray, fixed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep only the strictly convex vertices of many chains stored back to back.

    ``fixed`` marks each chain's first and last point (hull vertices, never dropped). Chains run
    the way their hull is traversed, counter-clockwise as displayed (x right, y down), and a
    point is dropped when the turn from its previous to its next surviving neighbour is not a
    strict counter-clockwise turn. After a first pass over all points only the neighbours of
    dropped points are retested. Integer arithmetic, so the result is exact.
    """
    dx = np.diff(x)
    dy = np.diff(y)
    keep = np.ones(x.size, dtype=bool)
    np.greater(dx[1:] * dy[:-1], dx[:-1] * dy[1:], out=keep[1:-1])
    keep |= fixed
    drop = np.flatnonzero(~keep)
    if drop.size == 0:
        return x, y, fixed
    x, y, fixed = x[keep], y[keep], fixed[keep]
    nv = x.size
    # survivors next to a dropped point: new index of the last one before it and the one after
    after = np.cumsum(keep)[drop]
    mark = np.zeros(nv + 1, dtype=bool)
    mark[after - 1] = True
    mark[after] = True
    cand = np.flatnonzero(mark[:nv])
    nxt = np.arange(1, nv + 1)
    prv = np.arange(-1, nv - 1)
    alive = np.ones(nv, dtype=bool)
    for _ in range(_MAX_PRUNE_ROUNDS):
        cand = cand[alive[cand] & ~fixed[cand]]
        if cand.size == 0:
            break
        p = prv[cand]
        q = nxt[cand]
        xc = x[cand]
        yc = y[cand]
        d = cand[(x[q] - xc) * (yc - y[p]) <= (xc - x[p]) * (y[q] - yc)]
        if d.size == 0:
            break
        alive[d] = False
        p = prv[d]
        q = nxt[d]
        while True:  # neighbours dropped in the same round: walk on to the nearest survivors
            dp = np.flatnonzero(~alive[p])
            dq = np.flatnonzero(~alive[q])
            if dp.size == 0 and dq.size == 0:
                break
            p[dp] = prv[p[dp]]
            q[dq] = nxt[q[dq]]
        nxt[p] = q
        prv[q] = p
        cand = np.concatenate([p, q])  # duplicates only cost a repeated test
    else:
        cand = cand[alive[cand] & ~fixed[cand]]
        if cand.size:
            _finish_chains(x, y, fixed, nxt, alive, cand)
    return x[alive], y[alive], fixed[alive]


def _finish_chains(
    x: np.ndarray,
    y: np.ndarray,
    fixed: np.ndarray,
    nxt: np.ndarray,
    alive: np.ndarray,
    cand: np.ndarray,
) -> None:
    """Sequential monotone-chain scan of the chains holding ``cand``; clears ``alive`` in place.

    For the rare chains :func:`_prune` has not settled within its round limit. The surviving
    points of a chain are monotone in y, so one stack scan leaves exactly its convex vertices.
    """
    fpos = np.flatnonzero(fixed)
    starts = fpos[0::2]
    chain_end = fpos[1::2]
    xs = x.tolist()
    ys = y.tolist()
    nx = nxt.tolist()
    for c in np.unique(np.searchsorted(starts, cand, side="right") - 1).tolist():
        i = int(starts[c])
        last = int(chain_end[c])
        stack = [i]
        while i != last:
            i = nx[i]
            while len(stack) >= 2:
                o, m = stack[-2], stack[-1]
                if (xs[i] - xs[m]) * (ys[m] - ys[o]) > (xs[m] - xs[o]) * (ys[i] - ys[m]):
                    break
                alive[m] = False
                stack.pop()
            stack.append(i)


def _polygon_measures(
    vx: np.ndarray, vy: np.ndarray, vstart: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, diameter and minimum width of strictly convex polygons stored back to back.

    Polygon p has vertices ``vstart[p]`` up to the next start, beginning at its top-left vertex
    and going down the left side (so its edge angles, measured with y up, increase from above
    -π to exactly π at the closing top edge). See the module docstring for the method.
    """
    nv = vx.size
    cnt = np.diff(vstart, append=nv)
    vp = np.repeat(np.arange(n), cnt)
    nxt = np.arange(1, nv + 1)
    nxt[vstart + cnt - 1] = vstart
    prv = np.arange(-1, nv - 1)
    prv[vstart] = vstart + cnt - 1
    xn = vx[nxt]
    yn = vy[nxt]
    ex = xn - vx
    ey = yn - vy
    area = 0.5 * np.abs(np.add.reduceat(vx * yn - xn * vy, vstart))
    phi = np.arctan2(-ey, ex.astype(np.float64))
    # direction opposite to each edge, folded into the polygon's angle range (-π, π]
    target = phi + math.pi
    target[target > math.pi] -= 2.0 * math.pi
    # first vertex whose outgoing edge angle is >= target: antipodal to the edge (or, when an
    # edge is parallel, one of its two ends; the vertex before it is evaluated too)
    anti = np.empty(nv, dtype=np.intp)
    for p0 in range(0, n, _SEARCH_BLOCK):
        s0 = int(vstart[p0])
        s1 = int(vstart[p0 + _SEARCH_BLOCK]) if p0 + _SEARCH_BLOCK < n else nv
        off = 8.0 * (vp[s0:s1] - p0)
        anti[s0:s1] = s0 + np.searchsorted(phi[s0:s1] + off, target[s0:s1] + off)
    c = np.stack([prv[anti], anti])
    dx = vx[c] - vx
    dy = vy[c] - vy
    width = np.abs(ex * dy - ey * dx).max(axis=0) / np.sqrt(ex * ex + ey * ey)
    feret_min = np.minimum.reduceat(width, vstart)
    feret_max = np.sqrt(np.maximum.reduceat((dx * dx + dy * dy).max(axis=0), vstart))
    return area, feret_max, feret_min


# --------------------------------------------------------------------------- benchmark
