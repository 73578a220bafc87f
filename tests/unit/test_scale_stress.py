"""The working-scale stress benchmark's frames: a thick support leaves the particles where they
were and fainter, the same draw for the same seed; a STEM training material is a set of its own
(for a network trained without it), and held-out sets are never counted as tuning sets."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.scale_stress import is_tuning, set_entry, transform


def _frame() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 128² HAADF-like frame: four bright 12 px discs on a dark, noisy support."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128]
    labels = np.zeros((128, 128), np.int32)
    boxes = []
    for k, (r, c) in enumerate(((30, 30), (30, 90), (90, 30), (90, 90)), start=1):
        labels[(yy - r) ** 2 + (xx - c) ** 2 <= 36] = k
        boxes.append((c - 6, r - 6, c + 6, r + 6))
    image = (0.1 + 0.8 * (labels > 0) + 0.02 * rng.standard_normal((128, 128))).astype(np.float32)
    return image, labels, np.asarray(boxes, np.float64)


def _contrast(image: np.ndarray, labels: np.ndarray) -> float:
    return float(image[labels > 0].mean() - image[labels == 0].mean())


@pytest.mark.parametrize("truth", ["labels", "boxes"])
def test_a_thick_support_leaves_the_particles_in_place_and_fainter(truth: str) -> None:
    image, labels, boxes = _frame()
    lab, bx = (labels, None) if truth == "labels" else (None, boxes)
    out, out_lab, out_boxes = transform(image, lab, bx, "thick", seed=4)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out_lab is lab and out_boxes is bx  # the truth is where it was
    before = _contrast((image - image.min()) / np.ptp(image), labels)
    assert 0.0 < _contrast(out, labels) < 0.8 * before  # added in HAADF, and fainter
    again, _, _ = transform(image, lab, bx, "thick", seed=4)
    other, _, _ = transform(image, lab, bx, "thick", seed=5)
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_a_dark_particle_gets_its_support_subtracted() -> None:
    image, labels, _ = _frame()
    dark = 1.0 - image  # bright field: particles darker than the support
    out, _, _ = transform(dark, labels, None, "thick", seed=4)
    assert _contrast(out, labels) < 0.0


def test_sets_and_which_may_tune() -> None:
    assert set_entry("stem-tune:Cu") == ("detector_stem.onnx", "stem-tune:Cu")
    assert set_entry("emps") == ("detector.onnx", "emps")
    assert set_entry("stem-tune") == ("detector_stem.onnx", "stem-tune")
    assert set_entry("msa-tune") == ("detector.onnx", "msa-tune")
    assert all(is_tuning(s) for s in ("stem-tune:Cu", "stem-tune", "emps-tune", "stem-train",
                                      "msa-tune"))
    assert not any(is_tuning(s) for s in ("stem", "emps", "nffa", "msa"))
    for bad in ("stem-tune:", "pd", "stem-tuning"):
        with pytest.raises(SystemExit, match="unknown set"):
            set_entry(bad)


@pytest.mark.parametrize("dark", [False, True])
def test_grains_are_large_flat_objects_of_the_particles_polarity(dark: bool) -> None:
    """The ``grains`` frame: one to three flat-topped objects 15-35 % of the side across,
    added where the particles are brighter (subtracted in bright field), the same draw for the
    same seed; the particles keep their truth."""
    from scipy import ndimage as ndi

    image, labels, boxes = _frame()
    image = np.pad(image, 64, mode="reflect")  # 256²: room for grains beside the particles
    labels = np.pad(labels, 64)
    if dark:
        image = 1.0 - image
    out, out_lab, out_boxes = transform(image, labels, None, "grains", seed=2)
    assert out.shape == image.shape and out.dtype == np.float32 and out_lab is labels
    base = (image - np.percentile(image, 0.5)) / np.ptp(np.percentile(image, [0.5, 99.5]))
    diff = out - base * (np.ptp(np.percentile(out, [0.5, 99.5])) or 1.0)
    grain = np.abs(diff - np.median(diff)) > 0.2
    lab, n = ndi.label(grain)
    assert 1 <= n <= 3
    widths = [2.0 * np.sqrt(np.sum(lab == k) / np.pi) for k in range(1, n + 1)]
    assert all(0.1 * 256 <= w <= 0.4 * 256 for w in widths), widths
    assert (np.median(diff[grain]) < 0) == dark  # the particles' polarity
    again, _, _ = transform(image, labels, None, "grains", seed=2)
    other, _, _ = transform(image, labels, None, "grains", seed=3)
    assert np.array_equal(out, again) and not np.array_equal(out, other)
