"""Held-out evaluation of the field-of-view classifier (ONNX Runtime CPU, no torch).

::

    python -m nanoscout.training.evaluate_classifier --model models/weights/classifier.onnx \
        --out benchmarks/results/classifier.json

Two disjoint sets of seeds (:data:`SEED_BASES`): ``--split test`` (default; the numbers a model
card reports, looked at once per shipped model) and ``--split validation`` (for choosing between
training runs and settings). Training uses ``nanoscout.training.train_classifier.TRAIN_SEED_BASE + k``,
never these.

* ``synthetic``: accuracy and confusion matrix (rows = true class, columns = predicted) on
  fresh fields of :func:`nanoscout.sim.fields.render_field`, 512x512, seeds ``synthetic base + k``;
  ``synthetic_1024`` the same at 1024x1024; with ``--n-wide``, ``synthetic_3to2`` (512x768)
  and ``synthetic_8to1`` (512x4096) the same on frames far from square, seen as the daemon
  sees them (:func:`nanoscout.analysis.classifier.view_count` views, probabilities averaged).
* ``cam``: on :func:`nanoscout.sim.fields.render_rod_among_spheres` fields (seeds ``cam base + k``)
  the peak of the ``cam`` output (the top class's map, whatever the top class is), mapped back
  to frame pixels, must fall inside the rod's box grown by half a CAM cell on every side.
* ``real``: EMPS validation papers labelled by :func:`nanoscout.training.field_labels.emps_field_label`
  (images it gives no class are only counted), the held-out STEM material (expected
  ``isolated_particles``), NFFA SEM particles (no class can be derived: predictions only).
* ``engine_ms``: a 1024x1024 uint16 frame, ``fixed_input`` + ONNX Runtime (2 threads), median
  of 30 runs after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np

from nanoscout.analysis.classifier import view_count
from nanoscout.analysis.preprocess import fixed_input, fixed_views
from nanoscout.engines import create_engine
from nanoscout.sim.fields import FIELD_CLASSES, render_field, render_rod_among_spheres

__all__ = ["SEED_BASES", "OnnxClassifier", "cam_peak_px", "evaluate_all",
           "evaluate_cam", "evaluate_images", "evaluate_real", "evaluate_synthetic",
           "time_engine"]

#: split -> evaluation -> seed base. "validation" holds the bases the version-2 model was reported
#: on (and version 3 was chosen on); "test" bases were first used for version 3's card. The v1
#: bases 3_000_000, 3_500_000 and 4_000_000 were looked at when the class definition changed.
SEED_BASES: dict[str, dict[str, int]] = {
    "validation": {"synthetic": 3_200_000, "synthetic_1024": 3_700_000, "cam": 4_200_000},
    "test": {"synthetic": 5_200_000, "synthetic_1024": 5_700_000, "cam": 6_200_000},
}


class OnnxClassifier:
    """The exported classifier under ONNX Runtime CPU: frame -> (probabilities, cam)."""

    def __init__(self, path: Path, classes: tuple[str, ...], size: int, threads: int = 2) -> None:
        self.engine = create_engine(path, "onnxruntime-cpu", threads=threads)
        self.classes = tuple(classes)
        self.size = int(size)

    @classmethod
    def from_card(cls, card_path: Path, threads: int = 2) -> OnnxClassifier:
        """Return the classifier described by a model card (validated, sha256 checked)."""
        from nanoscout.analysis.modelcard import ModelCard

        card = ModelCard.load(card_path)
        if card.classes is None or card.input.size is None:
            raise ValueError(f"model card {card_path} lacks classes or input.size")
        return cls(card.onnx_path(card_path), card.classes, card.input.size[0], threads)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (probabilities (C,), cam uint8 (h, w)) of one model input (1, 1, S, S)."""
        out = self.engine.infer({"image": x})
        return out["probabilities"][0], out["cam"][0]

    def run_views(self, xs: np.ndarray, wide: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Return (probabilities (C,): the mean of the views', cam uint8: the views' side by
        side along the frame's long side (columns when ``wide``), each its own top class's)
        of a frame's (n, 1, S, S) view inputs (:func:`~nanoscout.analysis.preprocess.fixed_views`;
        n = 1: :meth:`run`)."""
        runs = [self.run(x[None]) for x in xs]
        return (np.mean([r[0] for r in runs], axis=0),
                np.concatenate([r[1] for r in runs], axis=-1 if wide else -2))

    def predict(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (probabilities, cam) of a raw frame, seen as the daemon sees it: whole
        (fixed_input) up to 4:3, else in views (:func:`run_views`)."""
        n = view_count(np.shape(frame))
        if n == 1:
            return self.run(fixed_input(frame, (self.size, self.size)))
        return self.run_views(fixed_views(frame, (self.size, self.size), n),
                              frame.shape[1] >= frame.shape[0])


# ------------------------------------------------------------------------------- synthetic


def _field_job(job: tuple[str, int, int, tuple[int, int]]
               ) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int]]:
    kind, seed, size, shape = job
    rng = np.random.default_rng(seed)
    if kind == "rod":
        f = render_rod_among_spheres(rng, shape=shape)
        cls = FIELD_CLASSES.index("rods_wires")
    else:
        cls = int(kind)
        f = render_field(FIELD_CLASSES[cls], rng, shape=shape)
    return cls, fixed_views(f.image, (size, size), view_count(shape)), f.rod_boxes, f.image.shape


def _render(jobs: list[tuple[str, int, int, tuple[int, int]]], workers: int
            ) -> list[tuple[int, np.ndarray, np.ndarray, tuple[int, int]]]:
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(_field_job, jobs, chunksize=4)
    return [_field_job(j) for j in jobs]


def _confusion_report(classes: tuple[str, ...], y: np.ndarray, pred: np.ndarray
                      ) -> dict[str, Any]:
    n = len(classes)
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y, pred), 1)
    recall = {c: round(float(cm[k, k] / cm[k].sum()), 4) for k, c in enumerate(classes)
              if cm[k].sum()}
    return {"n": int(y.size), "accuracy": round(float(np.mean(y == pred)), 4) if y.size else None,
            "per_class_recall": recall, "confusion_matrix": cm.tolist(),
            "confusion_rows_cols": "rows = true class, columns = predicted, order of `classes`"}


def evaluate_synthetic(clf: OnnxClassifier, n_per_class: int,
                       seed_base: int = SEED_BASES["test"]["synthetic"],
                       shape: tuple[int, int] = (512, 512), workers: int = 2) -> dict[str, Any]:
    """Return accuracy and confusion matrix on fresh synthetic fields (seeds seed_base + k)."""
    n_cls = len(FIELD_CLASSES)
    jobs = [(str(k % n_cls), seed_base + k, clf.size, shape) for k in range(n_per_class * n_cls)]
    t0 = time.perf_counter()
    out = _render(jobs, workers)
    y = np.array([o[0] for o in out], np.int64)
    pred = np.array([int(np.argmax(clf.run_views(o[1])[0])) for o in out], np.int64)
    return {"data": (f"{len(jobs)} fresh render_field fields, {shape[0]}x{shape[1]}, "
                     f"{n_per_class} per class, seeds {seed_base}..{seed_base + len(jobs) - 1}"),
            "classes": list(FIELD_CLASSES), **_confusion_report(FIELD_CLASSES, y, pred),
            "seconds": round(time.perf_counter() - t0, 1)}


def cam_peak_px(cam: np.ndarray, frame_shape: tuple[int, int]) -> tuple[float, float]:
    """Return (x, y) frame px (pixel centres at integers) of the centre of the CAM's peak cell."""
    h, w = cam.shape
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return ((j + 0.5) * frame_shape[1] / w - 0.5, (i + 0.5) * frame_shape[0] / h - 0.5)


def evaluate_cam(clf: OnnxClassifier, n: int, seed_base: int = SEED_BASES["test"]["cam"],
                 shape: tuple[int, int] = (512, 512), workers: int = 2) -> dict[str, Any]:
    """Return the fraction of rod-among-spheres fields whose CAM peak lies on the rod's box."""
    jobs = [("rod", seed_base + k, clf.size, shape) for k in range(n)]
    out = _render(jobs, workers)
    hits, top_rod, hits_rod = 0, 0, 0
    tops: dict[str, int] = {}
    for _, x, boxes, fshape in out:
        p, cam = clf.run_views(x, fshape[1] >= fshape[0])
        top = clf.classes[int(np.argmax(p))]
        tops[top] = tops.get(top, 0) + 1
        cx, cy = cam_peak_px(cam, fshape)
        grow_x, grow_y = 0.5 * fshape[1] / cam.shape[1], 0.5 * fshape[0] / cam.shape[0]
        x0, y0, x1, y1 = boxes[0]
        hit = bool(x0 - grow_x <= cx <= x1 + grow_x and y0 - grow_y <= cy <= y1 + grow_y)
        hits += hit
        if top == "rods_wires":
            top_rod += 1
            hits_rod += hit
    return {"data": (f"{n} fresh render_rod_among_spheres fields {shape[0]}x{shape[1]}, seeds "
                     f"{seed_base}..{seed_base + n - 1}; hit = peak cell centre inside the rod "
                     "box grown by half a CAM cell; CAM of the top class"),
            "n": n, "hit_rate": round(hits / max(n, 1), 4), "top_class_counts": tops,
            "top_is_rods_wires": round(top_rod / max(n, 1), 4),
            "hit_rate_when_top_is_rods_wires": round(hits_rod / max(top_rod, 1), 4)}


# ------------------------------------------------------------------------------- real


def evaluate_images(clf: OnnxClassifier, images: list[np.ndarray], y: np.ndarray,
                    names: list[str]) -> dict[str, Any]:
    """Return accuracy / confusion of labelled whole images (class indices ``y``)."""
    pred = np.array([int(np.argmax(clf.predict(im)[0])) for im in images], np.int64)
    rep = _confusion_report(clf.classes, np.asarray(y, np.int64), pred)
    rep["classes"] = list(clf.classes)
    rep["errors"] = [f"{nm}: {clf.classes[int(t)]} -> {clf.classes[int(p)]}"
                     for nm, t, p in zip(names, y, pred, strict=True) if t != p][:30]
    return rep


def _counts(clf: OnnxClassifier, preds: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in preds:
        out[clf.classes[p]] = out.get(clf.classes[p], 0) + 1
    return out


def evaluate_real(clf: OnnxClassifier) -> dict[str, Any]:
    """Return results on the held-out real images (sets found under ../shared/data)."""
    from nanoscout.training import realdata
    from nanoscout.training.field_labels import emps_field_label

    out: dict[str, Any] = {}
    sets = realdata.available_sets()
    if "emps" in sets:
        imgs, ys, names, unl = [], [], [], []
        for s in realdata.iter_samples("emps"):
            assert s.labels is not None
            lab = emps_field_label(s.labels)
            if lab is None:
                unl.append(int(np.argmax(clf.predict(s.image)[0])))
                continue
            imgs.append(s.image)
            ys.append(FIELD_CLASSES.index(lab))
            names.append(s.id)
        rep = evaluate_images(clf, imgs, np.array(ys, np.int64), names)
        out["emps_validation"] = {
            "data": ("EMPS validation papers (models/splits/emps.json 'validation'), whole "
                     "figure crops; class from the instance maps by emps_field_label (rods: "
                     ">= 2 particles of aspect >= 3 not cut by the border; with none, "
                     "isolated: <= 20 % of particles touching, agglomerated: >= 60 %); "
                     "images without a class are only counted"),
            "n_unlabelled": len(unl), "unlabelled_predictions": _counts(clf, unl), **rep}
    if "stem" in sets:
        preds = [int(np.argmax(clf.predict(s.image)[0])) for s in realdata.iter_samples("stem")]
        k = FIELD_CLASSES.index("isolated_particles")
        out["stem_heldout"] = {
            "data": ("held-out STEM material (Pd: supported nanoparticles, HAADF/BF), whole "
                     "images; expected class isolated_particles"),
            "n": len(preds), "accuracy": round(float(np.mean(np.array(preds) == k)), 4)
            if preds else None, "predictions": _counts(clf, preds)}
    if "nffa" in sets:
        preds = [int(np.argmax(clf.predict(s.image)[0])) for s in realdata.iter_samples("nffa")]
        out["nffa_sem"] = {
            "data": ("NFFA-Europe SEM 'Particles' images (touching particles merged in the "
                     "masks, so isolated vs agglomerated cannot be derived): predictions only; "
                     "any particle class or out_of_focus would be plausible"),
            "n": len(preds), "predictions": _counts(clf, preds)}
    return out


# ------------------------------------------------------------------------------- timing


def time_engine(clf: OnnxClassifier, n: int = 30, side: int = 1024) -> dict[str, Any]:
    """Return median ms of fixed_input + ONNX Runtime on a ``side``² uint16 frame (n runs)."""
    f = render_field("isolated_particles", np.random.default_rng(7), shape=(side, side))
    frame = np.clip(f.image, 0, 65535).astype(np.uint16)
    for _ in range(3):
        clf.predict(frame)
    prep, total = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        x = fixed_input(frame, (clf.size, clf.size))
        t1 = time.perf_counter()
        clf.run(x)
        t2 = time.perf_counter()
        prep.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    return {f"{side}x{side}": {
        "preprocess": round(float(np.median(prep)), 2),
        "engine": round(float(np.median(np.array(total) - np.array(prep))), 2),
        "total": round(float(np.median(total)), 2), "total_min": round(float(np.min(total)), 2),
        "runs": n, "runtime": "onnxruntime CPU, 2 intra-op threads",
        "frame": f"{side}x{side} uint16; total = fixed_input + session.run"}}


def evaluate_all(clf: OnnxClassifier, *, n_per_class: int = 100, cam_n: int = 200,
                 n_1024: int = 10, real: bool = True, workers: int = 2,
                 split: str = "test", n_wide: int = 0) -> dict[str, Any]:
    """Return every evaluation of this module (synthetic, synthetic_1024, cam, real, engine) on
    the synthetic seeds of ``split`` ("test" or "validation", :data:`SEED_BASES`)."""
    if split not in SEED_BASES:
        raise ValueError(f"split {split!r} is not one of {', '.join(SEED_BASES)}")
    bases = SEED_BASES[split]
    cmd = f"python -m nanoscout.training.evaluate_classifier --split {split}"  # names the seeds used
    res: dict[str, Any] = {}
    res["synthetic"] = {"command": cmd, **evaluate_synthetic(
        clf, n_per_class, bases["synthetic"], workers=workers)}
    print(f"synthetic accuracy {res['synthetic']['accuracy']}", flush=True)
    if n_1024:
        res["synthetic_1024"] = {"command": cmd, **evaluate_synthetic(
            clf, n_1024, bases["synthetic_1024"], (1024, 1024), workers=workers)}
        print(f"synthetic 1024 accuracy {res['synthetic_1024']['accuracy']}", flush=True)
    for name, shape in (("synthetic_3to2", (512, 768)), ("synthetic_8to1", (512, 4096))):
        if n_wide:  # the square sets' seeds: the same specimens, wider frames
            res[name] = {"command": f"{cmd} --n-wide {n_wide}", **evaluate_synthetic(
                clf, n_wide, bases["synthetic"], shape, workers=workers)}
            print(f"{name} accuracy {res[name]['accuracy']}", flush=True)
    res["cam"] = {"command": cmd, **evaluate_cam(clf, cam_n, bases["cam"], workers=workers)}
    print(f"CAM hit rate {res['cam']['hit_rate']}", flush=True)
    if real:
        res["real"] = {"command": cmd, **evaluate_real(clf)}
    res["engine_ms"] = time_engine(clf)
    return res


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate a classifier ONNX + card, write the results JSON."""
    ap = argparse.ArgumentParser(description="evaluate the field-of-view classifier")
    ap.add_argument("--model", type=Path, default=Path("models/weights/classifier.onnx"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/classifier.json"))
    ap.add_argument("--split", choices=tuple(SEED_BASES), default="test",
                    help="which evaluation seeds (validation: for choosing between models)")
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--n-1024", type=int, default=10)
    ap.add_argument("--n-wide", type=int, default=0,
                    help="fields per class at 512x768 and 512x4096 (0: none)")
    ap.add_argument("--cam-n", type=int, default=200)
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write-card", action="store_true",
                    help="also replace the model card's evaluation and engine timings with "
                         "these results (the ONNX file and its sha256 are unchanged)")
    args = ap.parse_args(argv)
    clf = OnnxClassifier.from_card(args.model.with_suffix(".json"))
    res = evaluate_all(clf, n_per_class=args.n_per_class, cam_n=args.cam_n, n_1024=args.n_1024,
                       real=not args.no_real, workers=args.workers, split=args.split,
                       n_wide=args.n_wide)
    res["model"] = str(args.model)
    if args.write_card:
        from nanoscout.analysis.modelcard import ModelCard

        card_path = args.model.with_suffix(".json")
        card = ModelCard.load(card_path)
        evaluation = {k: v for k, v in res.items() if isinstance(v, dict) and k != "engine_ms"}
        card.model_copy(update={"evaluation": evaluation, "timings_ms": res["engine_ms"]}
                        ).dump(card_path)
        print(f"wrote the evaluation into {card_path}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v.get("accuracy", v.get("hit_rate")) for k, v in res.items()
                      if isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
