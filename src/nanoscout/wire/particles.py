"""The particle table: one numpy structured array row per measured particle.

It travels as a raw buffer in ``det.<source>`` messages, so its layout is part of wire
protocol v1 (little-endian, packed; v1.2 appended ``cluster``, so a row is one byte longer; v1.4
appended ``track_id``, four bytes more: 83 bytes a row). Lengths are nanometres when the frame is
calibrated and pixels when it is not; the ``det`` header says which (``units``).

Fields, in this order, with their numpy types (``<`` little-endian; no padding)
-------------------------------------------------------------------------------
id               <u4      particle id, unique within the frame (1..n; equals the instance label)
x, y             <f4      centroid, px, frame coordinates (x = column, y = row)
bbox             <i4 x 4  x0, y0, x1, y1 in px, x1/y1 exclusive
area_nm2         <f4      projected area (nm², or px² when uncalibrated)
ecd_nm           <f4      equivalent circular diameter 2·sqrt(area/π)
feret_max_nm     <f4      largest caliper diameter
feret_min_nm     <f4      smallest caliper diameter
major_nm         <f4      major axis of the ellipse with the same second moments
minor_nm         <f4      minor axis of that ellipse
orientation_deg  <f4      major-axis angle, degrees counter-clockwise from the +x axis, (-90, 90]
aspect_ratio     <f4      major / minor (≥ 1)
roundness        <f4      4·area / (π·major²)        (ImageJ convention, ≤ 1)
circularity      <f4      4π·area / perimeter², clipped to ≤ 1; perimeter: the 4-direction
                          Crofton estimate (scikit-image's perimeter_crofton): 0.99-1 for a
                          digital disk of 10-500 px, unbiased over orientations for shapes of
                          ~100 px and more, high below ~40 px (nanoscout.analysis.measure)
solidity         <f4      area / convex-hull area
score            <f4      detection confidence 0..1 (mean foreground probability inside the particle)
shape_class      u1       index into SHAPE_CLASSES: 0 unclassified, 1 sphere, 2 rod, 3 faceted,
                          4 plate, 5 irregular, 6 agglomerate (nanoscout.analysis.measure.classify_shapes)
border           ? (u1)   True when the particle touches the frame edge (excluded from size statistics)
cluster          u1       morphology cluster id of the source's online k-means
                          (nanoscout.analysis.clusters), 0..k-1; 255 = not assigned (clustering
                          off, or still buffering its first particles)
track_id         <u4      the physical particle this detection belongs to across the frames of its
                          source (nanoscout.analysis.tracking), 1, 2, ... unique per source; 0 =
                          not tracked (tracking off). A coalescence or a fragmentation ends the
                          tracks it joins or splits and starts new ones (the det header's
                          ``tracking.events`` names them)
"""

from __future__ import annotations

import numpy as np

PARTICLE_DTYPE = np.dtype(
    [
        ("id", "<u4"),
        ("x", "<f4"),
        ("y", "<f4"),
        ("bbox", "<i4", (4,)),
        ("area_nm2", "<f4"),
        ("ecd_nm", "<f4"),
        ("feret_max_nm", "<f4"),
        ("feret_min_nm", "<f4"),
        ("major_nm", "<f4"),
        ("minor_nm", "<f4"),
        ("orientation_deg", "<f4"),
        ("aspect_ratio", "<f4"),
        ("roundness", "<f4"),
        ("circularity", "<f4"),
        ("solidity", "<f4"),
        ("score", "<f4"),
        ("shape_class", "u1"),
        ("border", "?"),
        ("cluster", "u1"),
        ("track_id", "<u4"),
    ]
)

#: the fields holding one number a particle rule may test (bbox is a vector, border is
#: include_border's, shape_class is matched by name)
NUMERIC_FIELDS: tuple[str, ...] = tuple(
    name for name in PARTICLE_DTYPE.names or () if name not in ("bbox", "border", "shape_class")
)

#: per-particle shape classes; index stored in ``shape_class``. 0 means not classified.
SHAPE_CLASSES: tuple[str, ...] = (
    "unclassified",
    "sphere",
    "rod",
    "faceted",
    "plate",
    "irregular",
    "agglomerate",
)


#: ``cluster`` value of a particle without a morphology cluster
NO_CLUSTER = 255
#: ``track_id`` of a particle that is not tracked
NO_TRACK = 0


def empty_table(n: int = 0) -> np.ndarray:
    """Return a zero-filled particle table of ``n`` rows (``cluster`` = NO_CLUSTER)."""
    table = np.zeros(n, dtype=PARTICLE_DTYPE)
    table["cluster"] = NO_CLUSTER
    return table
