"""When, and at what cost, the detector's automatic working scale is estimated.

The detector (:class:`~nanoscout.analysis.detector.Detector`, ``scale="auto"``) finds a frame's
typical particle size with coarse-to-fine passes of its own network and resamples the frame so
that the particles have the size it was trained on. What a pass looks at and how its particle
sizes become a factor is the detector's business; this module decides the rest:

* **what each pass costs** (:func:`pass_window`): the first pass sees the whole frame as a
  thumbnail (longest side ``coarse_side_px``); a finer pass sees only a window of the frame
  whose side at that pass's scale is at most ``window_px``, so that no pass costs more than a
  ``window_px``² engine call, whatever the frame's size (a 4096² frame costs what a 1024² one
  does). Only when the window is the whole frame at factor 1 can the pass double as the
  frame's inference.
* **where the finer passes look** (:func:`content_centre`): their window is centred where the
  first pass found the most foreground, not at the frame's middle. A frame whose specimen lies
  off-centre, or around an empty middle (vacuum between aggregates, a hole in the support
  film), is judged by its particles; with the middle empty the finer passes found nothing,
  and the coarse pass alone then took the support aggregates for the particles (factors
  0.03-0.04 on 4096² frames, no particle found; ``benchmarks/scale_stress.py``).
* **what an operator's size range does** (:func:`hinted_diameter`): a frame may come with the
  range its median particle diameter lies in (the frame header's ``particle_size_nm``, the
  ``--particle-size-nm`` of ``nanoscout measure``). An estimate inside the range stands; one
  outside it followed something else (specks, support lumps or a grain texture, the failures
  that the passes above cannot always tell from particles) and is moved to the range's
  nearest end, the least change that agrees with the operator; a frame where the passes
  found nothing gets the range's geometric middle. Chosen on the EMPS tuning papers, told
  their true median within 2x and 3x: F1 0.935 alone, nearest end 0.937 / 0.936 (D50 error
  3.2 % -> 4.2 / 3.2 %), the middle 0.934 / 0.934 (D50 7.7 %): the middle took frames of a few
  particles about as large as the frame to ~30 px, where the network sees nothing
  (``benchmarks/results/size_hint_choice.json``).
* **when a stream re-estimates** (:class:`ScaleMemo`): a live stream (one key: source and
  pixel size) keeps its factor while its content stays the same. Each frame gets a cheap
  :class:`Signature` (about 1 ms at any frame size): the shape of the power spectrum of a
  256² thumbnail of the whole frame and of a 256² full-resolution window at its centre, in
  half-octave bands. The spectrum does not change when the stage drifts (a shift changes only
  phases) but moves when the particles' size in pixels changes (a new magnification, another
  area of the specimen, growth in situ). The factor is estimated again when the signature
  moved more than ``tolerance`` from the one of the frame last estimated, when the frame
  shape changes, and at the latest every ``max_age`` frames.

Measured on synthetic TEM / STEM / SEM streams (1024² and 2048², 256² windows): drifting
frames of one specimen stayed within 0.13 of their first frame's signature (mean absolute
difference of log band powers, drift up to 21 px), while the same kind of specimen with
particles 20 % smaller or 25 % larger moved it by 0.21-0.88; ``DEFAULT_TOLERANCE`` (0.15)
lies between.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from functools import cache

import numpy as np
import scipy.fft
import scipy.ndimage

__all__ = ["DEFAULT_TOLERANCE", "DEFAULT_WINDOW_PX", "ScaleMemo", "Signature", "content_centre",
           "hinted_diameter", "pass_window", "signature"]

#: a pass at a finer scale looks at a window of at most this many working px per side
DEFAULT_WINDOW_PX = 384
#: signature distance beyond which a stream's content counts as changed (see module docs)
DEFAULT_TOLERANCE = 0.15
#: side of the two views a signature is computed on, px
SIGNATURE_SIDE_PX = 256
#: keys (source, pixel size) remembered at most; the oldest is forgotten beyond
MAX_KEYS = 1024


def hinted_diameter(measured_px: float | None, range_px: tuple[float, float]
                    ) -> tuple[float, str]:
    """Return (median particle diameter, frame px; outcome) for an automatic measurement
    ``measured_px`` (None: no particle found) and an operator's range (lo, hi) for the frame's
    median particle diameter, frame px: the measurement where it lies within the range
    ("agreed"), else the range's nearest end, or its geometric middle where nothing was
    measured ("applied"). Raises ValueError unless 0 < lo <= hi, both finite.
    """
    lo, hi = (float(v) for v in range_px)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"particle size range {range_px!r} must be 0 < lo <= hi, finite (px)")
    if measured_px is None:
        return float(np.sqrt(lo * hi)), "applied"
    if lo <= measured_px <= hi:
        return float(measured_px), "agreed"
    return (lo if measured_px < lo else hi), "applied"


def pass_window(shape: tuple[int, int], s: float, window_px: int = DEFAULT_WINDOW_PX,
                centre: tuple[float, float] | None = None) -> tuple[slice, slice]:
    """Return the (rows, cols) window of a frame of ``shape`` that a pass at factor ``s``
    (working px per frame px) looks at: the whole frame when it is at most ``window_px``
    working px per side, else a window ``window_px / s`` frame px per side around ``centre``
    ((row, col), frame px; None: the frame's centre), moved inside the frame where it would
    cross an edge.
    """
    if not s > 0 or window_px < 1:
        raise ValueError(f"pass factor {s} must be > 0 and window_px {window_px} >= 1")
    side = max(1, int(window_px / s))
    out = []
    for axis, n in enumerate(shape):
        if n <= side:
            out.append(slice(0, n))
            continue
        a = (n - side) // 2 if centre is None else round(centre[axis] - side / 2)
        a = min(max(a, 0), n - side)
        out.append(slice(a, a + side))
    return out[0], out[1]


def content_centre(foreground: np.ndarray, s: float, origin: tuple[int, int] = (0, 0)
                   ) -> tuple[float, float] | None:
    """Return where a frame holds the most foreground: (row, col) in frame px, or None.

    ``foreground``: the foreground probability (0..1) of a pass at factor ``s`` over the frame
    window that starts at ``origin`` (frame px). The map is averaged over squares of a
    quarter of its shorter side (zero outside the map, so a dense edge does not outweigh a
    dense middle), and the centre of the best square is returned. None when the map holds
    less than one pixel of foreground in all: the frame's centre is then as good a guess.
    """
    p = np.asarray(foreground, np.float32)
    if p.ndim != 2 or p.size == 0 or not float(p.sum()) >= 1.0:
        return None
    side = max(3, round(min(p.shape) / 4))
    density = scipy.ndimage.uniform_filter(p, size=side, mode="constant")
    r, c = np.unravel_index(int(np.argmax(density)), density.shape)
    return origin[0] + (r + 0.5) / s, origin[1] + (c + 0.5) / s


@cache
def _bands(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The rfft2 bins of an n x n window that fall in a half-octave band (2 to n/2 cycles per
    window): their flat indices and band numbers, the number of bins per band, the window
    function, and the number of bands."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    r = np.sqrt(fy * fy + fx * fx) * n
    edges = 2.0 ** np.arange(1.0, np.log2(n / 2.0) + 0.01, 0.5)
    idx = (np.digitize(r, edges) - 1).ravel()
    used = np.flatnonzero((r.ravel() >= edges[0]) & (r.ravel() < edges[-1]))
    nb = len(edges) - 1
    hann = np.hanning(n).astype(np.float32)
    count = np.maximum(np.bincount(idx[used], minlength=nb), 1).astype(np.float64)
    return used, idx[used], count, np.outer(hann, hann), nb


def _profile(view: np.ndarray, n: int) -> np.ndarray:
    """Log of the share of the spectral power of ``view`` (at most n x n, float) in each band."""
    if view.shape != (n, n):  # a small frame: mirror it up to the window
        view = np.pad(view, ((0, n - view.shape[0]), (0, n - view.shape[1])), mode="symmetric")
    used, band_of, count, win, nb = _bands(n)
    v = (view - np.float32(view.mean())) * win
    f = scipy.fft.rfft2(v).ravel()[used]  # single precision: a float32 view stays float32
    p = f.real.astype(np.float64) ** 2 + f.imag.astype(np.float64) ** 2
    band = np.bincount(band_of, p, nb) / count
    total = float(band.sum())
    if not total > 0:  # a flat frame
        return np.full(nb, -30.0)
    return np.log(band / total + 1e-12)


@dataclass(frozen=True)
class Signature:
    """A cheap summary of a frame's content at the scales the estimate cares about (see the
    module docs). ``bands``: log band powers of the whole-frame thumbnail, then of the centre
    window."""

    bands: np.ndarray

    def distance(self, other: Signature) -> float:
        """Mean absolute difference of the log band powers (0 = the same spectrum shape)."""
        if self.bands.shape != other.bands.shape:
            return float("inf")
        return float(np.abs(self.bands - other.bands).mean())


def signature(x: np.ndarray, side: int = SIGNATURE_SIDE_PX) -> Signature:
    """Return the :class:`Signature` of a normalised frame ``x`` (2-D float)."""
    h, w = x.shape
    k = max(1, -(-max(h, w) // side))
    # a strided thumbnail: aliased, but the same way in every frame of a stream
    thumb = x[::k, ::k][:side, :side]
    r0, c0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    centre = x[r0:r0 + side, c0:c0 + side]
    return Signature(np.concatenate([_profile(thumb, side), _profile(centre, side)]))


@dataclass
class _Entry:
    shape: tuple[int, ...]
    scale: float
    signature: Signature | None
    age: int  # frames served since the estimate, that frame included
    #: whether the frame's settings were the card's own (BaseNetwork.covers), not the base's
    covered: bool = True
    #: what the operator's size range did to the estimate (:func:`hinted_diameter`; None: none)
    size_hint: str | None = None
    #: whether two estimation passes agreed on the factor (the detector's ``scale_agreed``)
    agreed: bool | None = None


class ScaleMemo:
    """Per-stream memory of the automatic working scale (see the module docs).

    ``max_age``: re-estimate at least every this many frames of a key (1 = every frame);
    ``tolerance``: the signature distance that counts as a change of content (None: no
    signatures, only shape and age decide, as before issue 21).
    """

    def __init__(self, max_age: int, tolerance: float | None = DEFAULT_TOLERANCE,
                 max_keys: int = MAX_KEYS) -> None:
        if max_age < 1:
            raise ValueError(f"max_age {max_age} must be >= 1")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"tolerance {tolerance} must be > 0 or None")
        self.max_age = max_age
        self.tolerance = tolerance
        self.max_keys = max_keys
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        #: why each estimate was made so far: "new", "shape", "content", "age"
        self.reasons: dict[str, int] = {"new": 0, "shape": 0, "content": 0, "age": 0}

    def covered(self, key: Hashable) -> bool:
        """What :meth:`store` remembered of ``key`` beside its factor (True for an unknown
        key): whether an adapted card's own settings apply to its frames
        (:meth:`~nanoscout.analysis.modelcard.BaseNetwork.covers`)."""
        e = self._entries.get(key)
        return True if e is None else e.covered

    def size_hint(self, key: Hashable) -> str | None:
        """What :meth:`store` remembered of ``key``'s operator size range (None for an unknown
        key or an estimate without one): "agreed" or "applied" (:func:`hinted_diameter`)."""
        e = self._entries.get(key)
        return None if e is None else e.size_hint

    def agreed(self, key: Hashable) -> bool | None:
        """What :meth:`store` remembered of whether two estimation passes agreed on ``key``'s
        factor (None for an unknown key or a card without the consistency check)."""
        e = self._entries.get(key)
        return None if e is None else e.agreed

    def __len__(self) -> int:
        return len(self._entries)

    def signature(self, x: np.ndarray) -> Signature | None:
        """The frame's signature, or None when signatures are off."""
        return None if self.tolerance is None else signature(x)

    def lookup(self, key: Hashable, shape: tuple[int, ...], sig: Signature | None
               ) -> float | None:
        """The remembered factor of ``key`` if it still holds for this frame (and count the
        frame), else None: the caller estimates and calls :meth:`store`."""
        e = self._entries.get(key)
        if e is None:
            reason = "new"
        elif e.shape != shape:
            reason = "shape"
        elif e.age >= self.max_age:
            reason = "age"
        elif (sig is not None and e.signature is not None and self.tolerance is not None
              and e.signature.distance(sig) > self.tolerance):
            reason = "content"
        else:
            e.age += 1
            self._entries.move_to_end(key)
            return e.scale
        self.reasons[reason] += 1
        return None

    def store(self, key: Hashable, shape: tuple[int, ...], sig: Signature | None,
              scale: float, covered: bool = True, size_hint: str | None = None,
              agreed: bool | None = None) -> None:
        """Remember the factor just estimated for ``key`` on a frame of ``shape`` (and
        whether an adapted card's own settings cover it, :meth:`covered`, what an
        operator's size range did to it, :meth:`size_hint`, and whether two passes agreed on
        it, :meth:`agreed`)."""
        self._entries[key] = _Entry(tuple(shape), float(scale), sig, 1, covered, size_hint,
                                    agreed)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_keys:  # many sources or calibrations
            self._entries.popitem(last=False)
