"""Check the incoherent HAADF approximation of ``nanoscout.training.haadf`` against abTEM multislice.

::

    python -m benchmarks.haadf_multislice --out benchmarks/results/haadf_multislice.json

A small patch (two ~1.3 nm clusters, Pt and Pd, side by side on a thin amorphous carbon slab)
is imaged twice at 0.1 nm per scan step, 200 kV, 22 mrad probe, HAADF detector 70-200 mrad:
by abTEM multislice (frozen atoms, one configuration) and by the approximation used for the
training frames (projected Z^n splatted on the pixel grid, convolved with the probe intensity of
:func:`nanoscout.training.haadf.probe_intensity`). Written: the Pearson correlation of the two images, the
ratio of the Pd to the Pt cluster's integrated signal in each (Z^1.7 predicts (46/78)^1.7 per
atom), and each run's seconds. Full multislice is too slow for whole frames on 2 CPU cores,
which is why the frames use the approximation; this patch tells how far to trust it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _patch() -> Any:
    """Return the ase Atoms of the patch (Angstrom): Pt and Pd clusters on 1 nm of carbon."""
    from ase import Atoms
    from ase.cluster import Octahedron

    cell = (40.0, 20.0, 30.0)
    parts = []
    for el, x in (("Pt", 10.0), ("Pd", 30.0)):
        c = Octahedron(el, 5, cutoff=1)
        c.translate(-c.positions.mean(0) + (x, 10.0, 16.0))
        parts.append(c)
    rng = np.random.default_rng(0)
    n_c = int(0.1 * 40 * 20 * 10)  # ~0.1 atoms / A^3 of amorphous carbon, 10 A thick
    carbon = Atoms("C" * n_c, positions=rng.uniform((0, 0, 2.0), (40.0, 20.0, 12.0), (n_c, 3)))
    atoms = parts[0] + parts[1] + carbon
    atoms.set_cell(cell)
    atoms.pbc = False
    return atoms


def run(step_nm: float = 0.1) -> dict[str, Any]:
    """Return the comparison (see the module docstring)."""
    import abtem

    from nanoscout.training.haadf import ELEMENTS, probe_intensity, splat

    atoms = _patch()
    t0 = time.perf_counter()
    pot = abtem.Potential(atoms, sampling=0.06, slice_thickness=2.0, projection="infinite")
    probe = abtem.Probe(energy=200e3, semiangle_cutoff=22.0)
    scan = abtem.GridScan(start=(0, 0), end=(40.0, 20.0), sampling=10 * step_nm)
    det = abtem.AnnularDetector(inner=70, outer=200)
    measured: Any = probe.scan(pot, scan=scan, detectors=det)
    ms = np.asarray(measured.compute().array, np.float64)
    t_ms = time.perf_counter() - t0
    # the approximation on the same scan grid (abTEM: first axis x)
    t0 = time.perf_counter()
    nx, ny = ms.shape
    img = np.zeros((ny, nx), np.float64)
    z = atoms.numbers.astype(np.float64)
    xy = np.stack([atoms.positions[:, 0] / (10 * step_nm) + 0.5,
                   atoms.positions[:, 1] / (10 * step_nm) + 0.5], 1)
    splat(img, xy, z ** 1.7)
    k = probe_intensity(step_nm, 200.0, 22.0, 0.0, 0.0, 0.0, radius_px=8)
    from scipy.signal import fftconvolve

    approx = fftconvolve(img, k, mode="same").T
    t_ap = time.perf_counter() - t0
    half = nx // 2

    def ratio(a: np.ndarray) -> float:
        bg = float(np.median(a))
        return float((a[half:] - bg).clip(0).sum() / (a[:half] - bg).clip(0).sum())

    return {
        "patch": "Pt and Pd octahedra (Octahedron(el, 5, cutoff=1), 44 atoms each) 2 nm apart "
                 "on 1 nm amorphous carbon; 4 x 2 nm scanned",
        "step_nm": step_nm, "probe": "200 kV, 22 mrad, no aberrations", "detector_mrad": [70, 200],
        "pearson_r": round(float(np.corrcoef(ms.ravel(), approx.ravel())[0, 1]), 4),
        "pd_over_pt_multislice": round(ratio(ms), 4),
        "pd_over_pt_approximation": round(ratio(approx), 4),
        "pd_over_pt_z17_per_atom": round((ELEMENTS["Pd"][0] / ELEMENTS["Pt"][0]) ** 1.7, 4),
        "seconds_multislice": round(t_ms, 1), "seconds_approximation": round(t_ap, 3),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: run the check and write its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/haadf_multislice.json"))
    ap.add_argument("--step-nm", type=float, default=0.1)
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    res = {"command": " ".join(["python -m benchmarks.haadf_multislice", *given]),
           "machine": f"{platform.machine()} CPU", **run(args.step_nm)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
