"""The dashboard's annotation desk: freeze a live frame, correct the detections, adapt the model.

An operator who sees misses or false detections on the live page:

1. **freezes** the current frame of a source (:meth:`AnnotationDesk.freeze`): the daemon writes
   its newest raw frame as calibrated TIFF (a ``save_frame`` control request) and, beside it,
   the detector's own instances (``NAME.detections.tif``); the desk opens both (they lie on
   this machine when the dashboard runs beside the daemon) and starts the annotation from the
   detector's instances;
2. **adds** a missed particle by a click (:meth:`AnnotationDesk.add`): its outline is proposed
   by a local threshold around the click (Otsu's threshold of a window around it, the
   connected region that holds the click, holes filled; scikit-image), painted only where no
   particle is yet; a click where nothing stands out gives a small disk;
3. **removes** a false detection by a click (:meth:`AnnotationDesk.remove`: the instance
   under the click, or the nearest within a few px);
4. **draws** an outline (:meth:`AnnotationDesk.draw`: a polygon, filled, over whatever was
   there);
5. every change is saved at once beside the frame as ``NAME.labels.tif``: a uint16 instance
   mask (0 background, 1..n particles, numbered without gaps), the mask format ``nanoscout
   models adapt`` reads;
6. **adapts** (:meth:`AnnotationDesk.adapt`): ``nanoscout models adapt FRAMES --labels MASKS
   --out DIR`` runs as a background process (this layer never imports the training code);
   its output lines are kept and its progress (the last percentage it printed) reported by
   :meth:`AnnotationDesk.adapt_status`; once done, the page offers the swap
   (:meth:`AnnotationDesk.swap_adapted`: a ``swap_model`` control request with the new
   model's sha256).

Annotations are addressed by the id the desk gives them (the frame file's stem); no path from
the page is ever opened. At most ``max_frames`` annotations are kept open (the oldest is closed;
its files stay).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.clients.dashboard.images import png_b64
from nanoscout.clients.query import QueryError, local_sha256, revert_model, save_frame, swap_model
from nanoscout.wire.errors import NanoscoutError
from nanoscout.wire.transport import ClientKeys

__all__ = ["ADAPT_COMMAND", "AdaptJob", "AnnotationDesk", "AnnotationError", "propose_outline"]

log = logging.getLogger("nanoscout.dashboard")

#: window side around a click for the proposed outline, px
_WINDOW_PX = 64
#: a click this close to an instance removes it, px
_PICK_RADIUS_PX = 6
_PERCENT = re.compile(r"(\d{1,3})%")
#: the adaptation, run as a process (this layer never imports the training code)
ADAPT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "nanoscout", "models", "adapt")


class AnnotationError(NanoscoutError):
    """An annotation request that cannot be done (unknown id, out of the frame, no daemon)."""


def propose_outline(image: np.ndarray, x: float, y: float, *, window: int = _WINDOW_PX,
                    fallback_radius: float = 6.0) -> np.ndarray:
    """A boolean mask of the particle at column ``x``, row ``y`` of ``image``: Otsu's threshold
    of a ``window`` px square around the click, the polarity that makes the click's side the
    particle, the connected region holding the click, holes filled. A window that is flat, or
    whose region touches its edge or fills most of it (a particle larger than the window), is
    tried again twice as large (up to 8 times ``window``). When the region is then empty or
    covers most of its window (nothing stands out), a disk of ``fallback_radius`` px."""
    img = np.asarray(image, dtype=np.float32)
    side = window
    while True:
        region, box, grow = _region(img, x, y, side)
        if not grow or side >= 8 * window or side >= max(img.shape):
            break
        side *= 2
    if region is None or region.sum() > 0.6 * region.size:
        rows, cols = img.shape
        yy, xx = np.ogrid[0:rows, 0:cols]
        return (yy - y) ** 2 + (xx - x) ** 2 <= fallback_radius ** 2
    r0, r1, c0, c1 = box
    mask = np.zeros(img.shape, dtype=bool)
    mask[r0:r1, c0:c1] = region
    return mask


def _region(img: np.ndarray, x: float, y: float, side: int
            ) -> tuple[np.ndarray | None, tuple[int, int, int, int], bool]:
    """(the thresholded region holding the click in a ``side`` px window, or None; the
    window (r0, r1, c0, c1); whether a larger window should be tried: the window is flat, or
    the region touches an edge of the window that is not the image's or fills most of it)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rows, cols = img.shape
    # a click in the last half pixel of the frame rounds to just past it
    r, c = min(max(int(round(y)), 0), rows - 1), min(max(int(round(x)), 0), cols - 1)
    half = side // 2
    r0, r1, c0, c1 = max(0, r - half), min(rows, r + half), max(0, c - half), min(cols, c + half)
    box = (r0, r1, c0, c1)
    patch = img[r0:r1, c0:c1]
    if patch.size <= 4 or float(patch.max()) <= float(patch.min()):
        return None, box, True
    smooth = ndimage.gaussian_filter(patch, 1.0)
    t = threshold_otsu(smooth)
    fg = smooth > t if smooth[r - r0, c - c0] > t else smooth <= t
    lab, _ = ndimage.label(fg)
    k = lab[r - r0, c - c0]
    if not k:
        return None, box, False
    region = ndimage.binary_fill_holes(lab == k)
    edge = ((r0 > 0 and region[0].any()) or (r1 < rows and region[-1].any())
            or (c0 > 0 and region[:, 0].any()) or (c1 < cols and region[:, -1].any()))
    return region, box, bool(edge or region.sum() > 0.6 * region.size)


def _display(image: np.ndarray) -> np.ndarray:
    """uint8 picture of a frame (0.5 / 99.5 percentiles)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return (np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)


def _outlines(labels: np.ndarray) -> np.ndarray:
    """RGBA overlay: the instances' boundaries in yellow, the rest transparent."""
    from skimage.segmentation import find_boundaries

    rgba = np.zeros((*labels.shape, 4), dtype=np.uint8)
    rgba[find_boundaries(labels, mode="inner")] = (255, 215, 0, 255)
    return rgba


@dataclass
class _Annotation:
    """One frozen frame and its instance mask (uint16, 0 background)."""

    id: str
    frame: Path
    header: dict[str, Any]
    image: np.ndarray
    labels: np.ndarray
    edits: int = 0

    @property
    def labels_path(self) -> Path:
        """Where the mask is saved: beside the frame, ``NAME.labels.tif``."""
        return self.frame.with_suffix(".labels.tif")

    def save(self) -> None:
        """Number the instances 1..n without gaps and write the mask (temporary name, then
        renamed)."""
        import tifffile
        from skimage.segmentation import relabel_sequential

        self.labels = relabel_sequential(self.labels)[0].astype(np.uint16)
        tmp = self.labels_path.with_name(f".{self.labels_path.name}.part")
        tifffile.imwrite(tmp, self.labels)
        tmp.replace(self.labels_path)

    def view(self) -> dict[str, Any]:
        """What the page shows: id, files, particles, edits and the outlines as RGBA PNG."""
        return {"id": self.id, "frame": str(self.frame), "labels_file": str(self.labels_path),
                "shape": list(self.labels.shape), "n": int(self.labels.max(initial=0)),
                "edits": self.edits, "source": self.header.get("source"),
                "seq": self.header.get("seq"), "pixel_size_nm": self.header.get("pixel_size_nm"),
                "overlay": png_b64(_outlines(self.labels))}


@dataclass
class AdaptJob:
    """A ``nanoscout models adapt`` run in the background."""

    argv: list[str]
    out: Path
    proc: subprocess.Popen[str]
    started: float = field(default_factory=time.monotonic)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    progress: float | None = None  # 0..1, the last percentage printed
    ended: float | None = None

    def pump(self) -> None:
        """Read the run's output (its progress bar and lines) until it ends."""
        assert self.proc.stdout is not None
        buf = ""
        for chunk in iter(lambda: self.proc.stdout.read(256), ""):  # type: ignore[union-attr]
            buf += chunk
            *done, buf = re.split(r"[\r\n]", buf)
            for line in (ln.strip() for ln in done):
                if line:
                    self.lines.append(line[:300])
                    pct = _PERCENT.findall(line)
                    if pct:
                        self.progress = min(1.0, int(pct[-1]) / 100)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.wait()
        self.ended = time.monotonic()

    def status(self) -> dict[str, Any]:
        """``state`` (running, done, failed), exit code, progress 0..1, seconds, the output
        folder, the model written (when done) and the last lines of its output."""
        code = self.proc.poll() if self.ended is not None else None
        state = "running" if code is None else "done" if code == 0 else "failed"
        model = self.out / "detector.onnx"
        if state == "done" and not model.is_file():
            state = "failed"
        return {"state": state, "exit_code": code, "progress": self.progress,
                "elapsed_s": round((self.ended or time.monotonic()) - self.started, 1),
                "out": str(self.out), "model": str(model) if state == "done" else None,
                "log": list(self.lines)[-8:]}


class AnnotationDesk:
    """Frozen frames, their annotations, the adaptation run and the swap, for the page."""

    def __init__(self, query: str, *, curve: ClientKeys | None = None, timeout: float = 10.0,
                 max_frames: int = 8, adapt_command: Sequence[str] = ADAPT_COMMAND,
                 adapt_args: Sequence[str] = ()) -> None:
        """``query``: the daemon's query socket; ``adapt_command``: the adaptation command
        (``IMAGES... --labels MASKS... --out DIR`` follow it); ``adapt_args``: more arguments
        for it (e.g. ``--minutes 3``)."""
        self.query = query
        self.curve = curve
        self.timeout = timeout
        self.max_frames = max_frames
        self.adapt_command = list(adapt_command)
        self.adapt_args = list(adapt_args)
        self._open: OrderedDict[str, _Annotation] = OrderedDict()
        self._lock = threading.Lock()
        self._edit = threading.Lock()  # one change of a mask at a time
        self.job: AdaptJob | None = None

    # ------------------------------------------------------------------ frames
    def freeze(self, source: str) -> dict[str, Any]:
        """Save the newest raw frame of ``source`` (the daemon) and open it for annotation,
        starting from the detector's instances; returns the view (picture, outlines)."""
        import tifffile

        try:
            reply = save_frame(self.query, source, 1, timeout=self.timeout, curve=self.curve)
        except QueryError as exc:
            raise AnnotationError(f"cannot freeze a frame of {source!r}: {exc}") from exc
        if not reply.files:
            raise AnnotationError(f"the daemon saved no frame of {source!r}")
        path = Path(reply.files[0])
        if not path.is_file():
            raise AnnotationError(f"the daemon wrote {path}, which is not on this machine: run "
                                  "the dashboard beside the daemon to annotate")
        with tifffile.TiffFile(path) as tf:
            image = tf.asarray()
            props = (tf.imagej_metadata or {}).get("Properties") or {}
        header = json.loads(props.get("nanoscout_frame") or "{}")
        det = path.with_suffix(".detections.tif")
        labels = (tifffile.imread(det).astype(np.uint16) if det.is_file()
                  else np.zeros(image.shape, np.uint16))
        ann = _Annotation(path.stem, path, header, image, labels)
        ann.save()
        with self._lock:
            self._open[ann.id] = ann
            while len(self._open) > self.max_frames:
                self._open.popitem(last=False)
        out = ann.view()
        out["image"] = png_b64(_display(image))
        return out

    def _get(self, ann_id: str) -> _Annotation:
        with self._lock:
            ann = self._open.get(ann_id)
        if ann is None:
            raise AnnotationError(f"no open annotation {ann_id[:80]!r} (open: {list(self._open)})")
        return ann

    def _point(self, ann: _Annotation, x: float, y: float) -> tuple[int, int]:
        rows, cols = ann.labels.shape
        if not (0 <= x < cols and 0 <= y < rows):
            raise AnnotationError(f"({x:g}, {y:g}) is outside the {cols}x{rows} px frame")
        return int(y), int(x)

    def add(self, ann_id: str, x: float, y: float) -> dict[str, Any]:
        """Add the particle at column ``x``, row ``y`` (frame px) with a proposed outline."""
        ann = self._get(ann_id)
        r, c = self._point(ann, x, y)
        with self._edit:
            if ann.labels[r, c]:
                raise AnnotationError(f"particle {int(ann.labels[r, c])} is there already")
            mask = propose_outline(ann.image, x, y) & (ann.labels == 0)
            ann.labels[mask] = int(ann.labels.max(initial=0)) + 1
            return self._changed(ann)

    def remove(self, ann_id: str, x: float, y: float) -> dict[str, Any]:
        """Remove the instance under (or nearest within a few px of) the click."""
        ann = self._get(ann_id)
        r, c = self._point(ann, x, y)
        with self._edit:
            k = int(ann.labels[r, c])
            if not k:
                p = _PICK_RADIUS_PX
                win = ann.labels[max(0, r - p):r + p + 1, max(0, c - p):c + p + 1]
                rr, cc = np.nonzero(win)
                if rr.size == 0:
                    raise AnnotationError(f"no particle within {p} px of ({x:g}, {y:g})")
                i = int(np.argmin((rr - min(r, p)) ** 2 + (cc - min(c, p)) ** 2))
                k = int(win[rr[i], cc[i]])
            ann.labels[ann.labels == k] = 0
            return self._changed(ann)

    def draw(self, ann_id: str, points: Sequence[Sequence[float]]) -> dict[str, Any]:
        """Add a particle outlined by the polygon ``points`` ([[x, y], ...], frame px)."""
        from skimage.draw import polygon

        ann = self._get(ann_id)
        if len(points) < 3:
            raise AnnotationError(f"an outline needs at least 3 points, got {len(points)}")
        xy = np.asarray(points, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
            raise AnnotationError("an outline is a list of [x, y] points")
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape=ann.labels.shape)
        if rr.size == 0:
            raise AnnotationError("the outline covers no pixel of the frame")
        with self._edit:
            ann.labels[rr, cc] = int(ann.labels.max(initial=0)) + 1
            return self._changed(ann)

    def _changed(self, ann: _Annotation) -> dict[str, Any]:
        ann.edits += 1
        ann.save()
        return ann.view()

    def annotations(self) -> list[dict[str, Any]]:
        """The open annotations (id, files, particles, edits)."""
        with self._lock:
            anns = list(self._open.values())
        return [{k: v for k, v in a.view().items() if k != "overlay"} for a in anns]

    # ------------------------------------------------------------------ adapt and swap
    def adapt(self, ids: Sequence[str] = ()) -> dict[str, Any]:
        """Start ``nanoscout models adapt`` on the annotations ``ids`` (default: every open
        one with an edit) in the background; AnnotationError while one runs."""
        if self.job is not None and self.job.ended is None:
            raise AnnotationError("an adaptation is running already")
        anns = [self._get(i) for i in ids] if ids else [
            a for a in list(self._open.values()) if a.edits]
        if not anns:
            raise AnnotationError("nothing to adapt from: freeze a frame and correct it first")
        out = anns[0].frame.parent / "adapted" / time.strftime("%Y%m%d-%H%M%S")
        argv = [*self.adapt_command, *[str(a.frame) for a in anns],
                "--labels", *[str(a.labels_path) for a in anns], "--out", str(out),
                *self.adapt_args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)
        job = self.job = AdaptJob(argv, out, proc)
        threading.Thread(target=job.pump, name="dashboard-adapt", daemon=True).start()
        log.info("adapting from %d annotated frame(s) into %s", len(anns), out)
        return job.status()

    def adapt_status(self) -> dict[str, Any]:
        """The adaptation run's state, progress and last lines ({"state": "none"} before)."""
        return {"state": "none"} if self.job is None else self.job.status()

    def swap_adapted(self) -> dict[str, Any]:
        """Hot-swap the daemon to the model the finished adaptation wrote."""
        st = self.adapt_status()
        if st.get("state") != "done" or not st.get("model"):
            raise AnnotationError(f"no adapted model to swap to (adaptation: {st['state']})")
        model = Path(st["model"])
        try:
            reply = swap_model(self.query, model, local_sha256(model), curve=self.curve)
        except QueryError as exc:
            raise AnnotationError(f"swap refused, the daemon keeps its model: {exc}") from exc
        return reply.model_dump(mode="json")

    def revert(self) -> dict[str, Any]:
        """Put the daemon back on the model before its last swap."""
        try:
            return revert_model(self.query, timeout=self.timeout,
                                curve=self.curve).model_dump(mode="json")
        except QueryError as exc:
            raise AnnotationError(str(exc)) from exc

    def save(self, source: str, frames: int = 1) -> dict[str, Any]:
        """Have the daemon save the newest ``frames`` raw frames of ``source``."""
        try:
            return save_frame(self.query, source, frames, timeout=self.timeout,
                              curve=self.curve).model_dump(mode="json")
        except QueryError as exc:
            raise AnnotationError(str(exc)) from exc

    def close(self) -> None:
        """Stop a running adaptation."""
        if self.job is not None and self.job.ended is None:
            self.job.proc.terminate()
