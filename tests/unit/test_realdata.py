"""Real-data loaders and held-out splits (skip without ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoscout.training import realdata
from nanoscout.wire.errors import ConfigError


def test_emps_split_deterministic_disjoint_complete(shared_data: Path) -> None:
    a = realdata.emps_split(shared_data)
    assert a == realdata.emps_split(shared_data)
    rows = realdata.emps_index(shared_data)
    ids = [i for i, _ in rows]
    assert sorted(a["train"] + a["validation"]) == sorted(ids)  # every image exactly once
    doi = dict(rows)
    val_dois = {doi[i] for i in a["validation"]}
    assert val_dois == set(a["validation_dois"])
    assert not val_dois & {doi[i] for i in a["train"]}
    assert 0.1 < len(val_dois) / a["n_papers"] < 0.4
    committed = realdata.load_split("emps")
    assert committed["validation"] == a["validation"]


def test_stem_split_holds_out_whole_materials(shared_data: Path) -> None:
    s = realdata.stem_split(shared_data)
    assert realdata.stem_material("PtC2") == "Pt" == realdata.stem_material("Pt_carbon1")
    assert realdata.stem_material("PtW3") == "PtW"
    assert realdata.stem_material("Cu_silica1") == "Cu"
    held = set(s["validation_materials"])
    assert held and {realdata.stem_material(n) for n in s["validation"]} == held
    assert not held & {realdata.stem_material(n) for n in s["train"]}
    assert sorted(s["train"] + s["validation"]) == realdata.stem_names(shared_data)
    assert realdata.load_split("stem")["validation"] == s["validation"]


def test_loaders_shapes_dtypes_counts(shared_data: Path) -> None:
    e = realdata.load_emps("f78844f8ce", shared_data)
    assert e.image.dtype == np.uint8 and e.image.shape == (512, 680)
    assert e.labels is not None and e.labels.dtype == np.int32 and e.labels.max() == 1
    st = realdata.load_stem("Pt2", shared_data)
    rows = np.loadtxt(shared_data / "stem-dev" / "labels" / "Pt2.txt", ndmin=2)
    assert st.boxes is not None and st.boxes.shape == (len(rows), 4)
    h, w = st.image.shape
    assert st.boxes[0, 2] - st.boxes[0, 0] == pytest.approx(rows[0, 3] * w)
    assert (st.boxes[:, 0] >= -1).all() and (st.boxes[:, 2] <= w + 1).all()
    n = realdata.load_nffa(realdata.nffa_names(shared_data)[1], shared_data)
    assert n.image.shape == (768, 1024) and n.labels is not None
    assert n.labels.max() == 52  # particles = the 0-phase of the mask, 8-connected
    assert 0.0 < (n.labels > 0).mean() < 0.5


def test_msa_split_holds_out_frames_and_loads_masks(shared_data: Path) -> None:
    split = realdata.msa_split(shared_data)
    held, train = set(split["validation"]), set(split["train"])
    assert len(held) == realdata.MSA_HELDOUT and not held & train
    assert held | train == set(realdata.msa_names(shared_data))
    assert split == {**realdata.load_split("msa"), "rule": split["rule"]}
    s = realdata.load_msa(sorted(held)[0], shared_data)
    assert s.image.dtype == np.uint8 and s.labels is not None and s.labels.max() >= 5
    assert [x.id for x in realdata.iter_samples("msa", shared_data)] == sorted(held)
    # the tuning frames are the training split, never a held-out frame
    assert [x.id for x in realdata.iter_samples("msa-tune", shared_data)] == split["train"]


def test_stem_material_names_are_one_training_material_and_refuse_the_held_out(
        shared_data: Path) -> None:
    split = realdata.load_split("stem")
    cu = realdata.stem_material_names("Cu", shared_data)
    assert cu and all(realdata.stem_material(n) == "Cu" for n in cu)
    assert set(cu) <= set(split["train"])  # type: ignore[arg-type]
    assert realdata.stem_material_names("Pt", shared_data) == realdata.stem_tuning_names(shared_data)
    with pytest.raises(ConfigError, match="not a STEM training material"):
        realdata.stem_material_names("Pd", shared_data)  # held out: never chosen on
    ids = [s.id for s in realdata.iter_samples("stem-tune:Cu", shared_data, max_images=2)]
    assert ids == cu[:2]


def test_training_leaves_out_the_named_stem_materials(shared_data: Path) -> None:
    pytest.importorskip("torch")
    from nanoscout.training.train import real_exclusions

    pt = realdata.stem_tuning_names(shared_data)
    cu = realdata.stem_material_names("Cu", shared_data)
    assert real_exclusions(False, False, "", shared_data) == ()
    assert real_exclusions(False, True, "", shared_data) == tuple(pt)
    assert real_exclusions(False, True, " Cu ,", shared_data) == tuple(pt + cu)
    assert real_exclusions(False, False, "Cu", shared_data) == tuple(cu)
    emps = real_exclusions(True, False, "", shared_data)
    assert emps and not set(emps) & set(pt + cu)
    with pytest.raises(ConfigError, match="Pd"):
        real_exclusions(False, False, "Pd", shared_data)
