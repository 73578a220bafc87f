"""Pseudo-masks for box-only truth, refined by a detector: the STEM training materials.

The STEM training images carry boxes only, and training takes the ellipse inscribed in each
box as the particle's mask (:func:`nanoscout.training.crops.ellipse_labels`). A real particle
is no ellipse: faceted, elongated or cut by its neighbour, its outline is what the image shows.
Here a detector that has already learnt particles draws that outline, and the box keeps it
honest:

* the detector runs on each training image at the working scale the image's own boxes call for
  (``target_diameter_px`` of its card over the boxes' area-weighted median sqrt(w h), px), with
  a low score cut (``MIN_SCORE``: a box already says that a particle is there);
* for each box (larger first, as the ellipses), the predicted instance covering most of the
  box's inscribed ellipse, cut to the box, becomes the pseudo-mask if its bounding box matches
  the box (IoU >= ``MIN_BOX_IOU``) and it covers at least ``MIN_FILL`` of the ellipse;
  otherwise the ellipse stays (a particle the detector misses, or merges with its neighbour,
  is still trained on as labelled).

``python -m nanoscout.training.pseudo_masks --model M.onnx --out DIR`` writes one compressed
``<id>.npz`` (``labels``: uint16 instance map, px) per STEM training image and ``index.json``
(the model, its sha256, the settings, how many boxes each image refined); ``train
--stem-masks DIR`` trains on them (:func:`nanoscout.training.crops.load_real_training`).
``--exclude-stem-tuning`` leaves the STEM tuning material out, for a detector that must never
have seen it. Nothing here reads a validation image: the ids come from the committed split.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["MAX_BOX_FILL", "MIN_BOX_IOU", "MIN_FILL", "MIN_SCORE", "refine", "write_masks"]

#: a predicted instance replaces a box's ellipse only if its bounding box matches the box this well
MIN_BOX_IOU = 0.6
#: ... and it covers at least this share of the box's inscribed ellipse
MIN_FILL = 0.5
#: ... and fills at most this share of the box (a disc fills pi / 4 = 0.785 of its square box)
MAX_BOX_FILL = 0.9
#: score cut of the detector that draws the outlines (a box already says a particle is there)
MIN_SCORE = 0.5


def refine(pred: np.ndarray, boxes: np.ndarray, min_box_iou: float = MIN_BOX_IOU,
           min_fill: float = MIN_FILL, max_box_fill: float = MAX_BOX_FILL
           ) -> tuple[np.ndarray, int]:
    """Return (int32 instance map, number of boxes refined) for ``boxes`` ((N, 4) x0, y0, x1,
    y1 px) given a detector's instance map ``pred`` of the same image (int, 0 background).

    Each box gets the predicted instance that covers most of its inscribed ellipse, cut to the
    box, where that instance's bounding box has IoU >= ``min_box_iou`` with the box, it covers
    >= ``min_fill`` of the ellipse and fills <= ``max_box_fill`` of the box (the box's pixels
    within the image); the ellipse otherwise. Boxes are drawn larger first,
    so a small particle overlapping a large one stays visible (as
    :func:`~nanoscout.training.crops.ellipse_labels`).
    """
    from nanoscout.training.crops import ellipse_labels
    from nanoscout.training.evaluate import box_iou

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = pred.shape
    out = np.zeros((h, w), np.int32)
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    refined = 0
    for k, i in enumerate(order, start=1):
        x0, y0, x1, y1 = boxes[i]
        r0, r1 = max(0, int(math.floor(y0))), min(h, int(math.ceil(y1)))
        c0, c1 = max(0, int(math.floor(x0))), min(w, int(math.ceil(x1)))
        if r0 >= r1 or c0 >= c1:
            continue
        ell = ellipse_labels((r1 - r0, c1 - c0), np.array([[x0 - c0, y0 - r0, x1 - c0,
                                                            y1 - r0]])) > 0
        if not ell.any():
            continue
        win = pred[r0:r1, c0:c1]
        ids, counts = np.unique(win[ell & (win > 0)], return_counts=True)
        mask = ell
        if ids.size:
            best = int(ids[np.argmax(counts)])
            cand = ndi.binary_fill_holes(win == best)
            if counts.max() >= min_fill * ell.sum() and cand.sum() <= max_box_fill * win.size:
                rr, cc = np.nonzero(cand)
                cb = (cc.min() + c0, rr.min() + r0, cc.max() + 1 + c0, rr.max() + 1 + r0)
                if box_iou(np.array(cb), boxes[i])[0, 0] >= min_box_iou:
                    mask, refined = cand, refined + 1
        out[r0:r1, c0:c1][mask] = k
    return out, refined


def write_masks(model: Path, out: Path, *, root: Path | None = None,
                exclude: tuple[str, ...] = (), threads: int = 2) -> dict[str, Any]:
    """Write the pseudo-masks of every STEM training image (split 'train', minus ``exclude``)
    drawn by detector ``model`` (ONNX with its card) into ``out``; return the index (also
    written to ``out/index.json``)."""
    from nanoscout.analysis.detector import Detector
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.engines import create_engine
    from nanoscout.training.evaluate import true_median_px
    from nanoscout.training.realdata import load_split, load_stem

    card = ModelCard.load(model.with_suffix(".json"))
    if card.thresholds is not None:
        card = card.model_copy(update={"thresholds": card.thresholds.with_cut(MIN_SCORE)})
    auto = None if card.working_scale is None else card.working_scale.auto
    if auto is None:
        raise ValueError(f"{model}: its card has no automatic working scale to size images by")
    engine = create_engine(model, "onnxruntime-cpu", threads=threads)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"model": str(model), "model_sha256": card.sha256,
                             "min_score": MIN_SCORE, "min_box_iou": MIN_BOX_IOU,
                             "min_fill": MIN_FILL, "max_box_fill": MAX_BOX_FILL,
                             "excluded": sorted(exclude), "images": {}}
    t0 = time.perf_counter()
    ids = [i for i in load_split("stem")["train"] if i not in set(exclude)]
    for image_id in ids:
        s = load_stem(image_id, root)
        assert s.boxes is not None
        if not len(s.boxes):
            continue
        median = true_median_px(s)  # area-weighted, of the boxes' sqrt(w h)
        factor = auto.factor(median) if median > 0 else 1.0
        det = Detector(engine, card, scale=factor)
        labels, n = refine(det.detect(s.image).labels, s.boxes)
        np.savez_compressed(out / f"{image_id}.npz", labels=labels.astype(np.uint16))
        index["images"][image_id] = {"boxes": len(s.boxes), "refined": n,
                                     "factor": round(factor, 4)}
        print(f"{image_id}: {n}/{len(s.boxes)} boxes refined (factor {factor:.3f})", flush=True)
    index["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True,
                    help="the detector (ONNX, its card beside it) that draws the outlines")
    ap.add_argument("--out", type=Path, required=True, help="folder for <id>.npz and index.json")
    ap.add_argument("--exclude-stem-tuning", action="store_true",
                    help="leave the STEM tuning material out (a detector that never saw it)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    exclude: tuple[str, ...] = ()
    if args.exclude_stem_tuning:
        from nanoscout.training.realdata import stem_tuning_names

        exclude = tuple(stem_tuning_names())
    index = write_masks(args.model, args.out, exclude=exclude, threads=args.threads)
    n = sum(v["boxes"] for v in index["images"].values())
    r = sum(v["refined"] for v in index["images"].values())
    print(f"{len(index['images'])} images, {r}/{n} boxes refined, {index['seconds']} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
