"""Weight averaging (``nanoscout.training.soup``): the mean of fine-tuned runs of one start,
exported as one detector; members of different starts refused; the recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from nanoscout.training.soup import average, load_members, main, member_args  # noqa: E402
from nanoscout.training.unet_deep import build_network  # noqa: E402

START = {"from_checkpoint": "p1/detector.pt", "steps": 2400, "final_loss": 0.46}


def _member(path: Path, seed: int, width: int = 8, start: dict[str, Any] | None = None) -> Any:
    torch.manual_seed(seed)
    net = build_network("unet", width)
    with torch.no_grad():  # BatchNorm scales and statistics of their own, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(seed)
    net.eval()
    torch.save({"state_dict": net.state_dict(), "width": width, "arch": "unet",
                "training": {"command": f"train --seed {seed}", "wall_seconds": 10.0 * seed,
                             "args": {"seed": str(seed)},
                             "phases": {"synthetic": start or START, "real": {"seed": seed}}}},
               path)
    return net


def test_the_average_is_the_mean_of_every_float_tensor_and_the_first_members_counters(
        tmp_path: Path) -> None:
    nets = [_member(tmp_path / f"{k}.pt", k + 1) for k in range(3)]
    cks = load_members([tmp_path / f"{k}.pt" for k in range(3)])
    got = average([ck["state_dict"] for ck in cks], "unet", 8)
    sds = [n.state_dict() for n in nets]
    for name, v in got.items():
        if v.dtype.is_floating_point:
            want = (sds[0][name] + sds[1][name] + sds[2][name]) / 3
            assert torch.allclose(v, want, atol=1e-6), name
            assert not torch.equal(v, sds[0][name]), name
        else:
            assert torch.equal(v, sds[0][name]), name
    assert any(k.endswith("running_var") for k in got)


def test_members_of_different_starts_widths_or_one_alone_are_refused(tmp_path: Path) -> None:
    _member(tmp_path / "a.pt", 1)
    _member(tmp_path / "b.pt", 2, start={**START, "final_loss": 0.51})
    _member(tmp_path / "c.pt", 3, width=12)
    with pytest.raises(ValueError, match="did not start from one phase 1"):
        load_members([tmp_path / "a.pt", tmp_path / "b.pt"])
    with pytest.raises(ValueError, match="width 12"):
        load_members([tmp_path / "a.pt", tmp_path / "c.pt"])
    with pytest.raises(ValueError, match="at least two"):
        load_members([tmp_path / "a.pt"])
    with pytest.raises(SystemExit, match="did not start from one phase 1"):
        main(["--members", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out",
              str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "out").exists()


def test_the_soup_exports_the_averaged_network_with_the_variants_card(tmp_path: Path) -> None:
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.training.export import VARIANTS

    nets = [_member(tmp_path / f"{k}.pt", k + 1) for k in range(2)]
    main(["--members", str(tmp_path / "0.pt"), str(tmp_path / "1.pt"), "--variant", "stem",
          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--eval-n", "0",
          "--no-real-eval", "--no-timing", "--threads", "1"])
    onnx = tmp_path / "out" / VARIANTS["stem"].file
    card = ModelCard.load(onnx.with_suffix(".json"))
    assert card.version == VARIANTS["stem"].version
    soup = card.training.model_dump()["soup"]
    assert [m["command"] for m in soup["members"]] == ["train --seed 1", "train --seed 2"]
    assert card.training.wall_seconds == pytest.approx(30.0)
    # the exported network is the mean of the two, not either of them
    ref = build_network("unet", 8)
    ref.load_state_dict(average([n.state_dict() for n in nets], "unet", 8))
    ref.eval()
    x = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)
    got = ort.InferenceSession(str(onnx)).run(None, {"image": x})[0]
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
        first = nets[0](torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - want)) < 1e-3
    assert np.max(np.abs(got - first)) > 1e-2
    assert (tmp_path / "work" / "soup.pt").is_file()


def test_member_commands_and_their_order() -> None:
    args = member_args("stem", "low-dose", Path("p1.pt"), Path("w"), 1)
    assert args[args.index("--low-dose-p") + 1] == "0.5"
    assert args[args.index("--init") + 1] == "p1.pt"
    assert args[args.index("--checkpoint") + 1] == str(Path("w/low-dose/detector.pt"))
    masks = member_args("stem", "masks", Path("p1.pt"), Path("w"), 1, Path("w/pm"))
    assert masks[masks.index("--stem-masks") + 1] == str(Path("w/pm"))
    with pytest.raises(ValueError, match="pseudo-masks folder"):
        member_args("stem", "masks", Path("p1.pt"), Path("w"), 1)
    with pytest.raises(ValueError, match="unknown member"):
        member_args("stem", "seed2", Path("p1.pt"), Path("w"), 1)
    with pytest.raises(SystemExit, match="list plain before masks"):
        main(["--arms", "masks,plain", "--out", "unused", "--work", "unused"])


def test_the_recipe_trains_phase_1_and_each_member_then_averages(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    """The whole recipe at two steps a phase: phase 1, the plain member, the masks it draws
    on the STEM training images, the masks member trained on them, the soup and its card."""
    from nanoscout.analysis.modelcard import ModelCard

    work, out = tmp_path / "work", tmp_path / "out"
    main(["--variant", "stem", "--arms", "plain,masks", "--work", str(work), "--out", str(out),
          "--eval-n", "0", "--no-real-eval", "--no-timing", "--threads", "1",
          "--steps", "2", "--finetune-steps", "2", "--batch", "2", "--pool", "2", "--width", "8"])
    assert (work / "phase1" / "detector.pt").is_file()
    index = json.loads((work / "pseudo_masks" / "index.json").read_text())
    assert index["model"] == str(work / "plain" / "detector_stem.onnx") and index["images"]
    cks = load_members([work / "plain" / "detector.pt", work / "masks" / "detector.pt"])
    assert cks[1]["training"]["phases"]["real"]["stem_masks"] == str(work / "pseudo_masks")
    assert cks[0]["training"]["phases"]["real"]["steps"] == 2
    card = ModelCard.load(out / "detector_stem.json")
    members = card.training.model_dump()["soup"]["members"]
    assert [Path(m["checkpoint"]).parent.name for m in members] == ["plain", "masks"]
    assert "--stem-masks" in members[1]["command"]


def test_an_exported_start_averages_with_its_fine_tunings_and_nothing_else(
        tmp_path: Path) -> None:
    """WiSE-FT: the exported network (BatchNorms folded) and a run fine-tuned from it with
    ``train --init X.onnx``; a run that did not start there, or two exported networks, refused."""
    from nanoscout.analysis.modelcard import sha256_file
    from nanoscout.training.export import export_onnx
    from nanoscout.training.onnx_weights import unet_from_onnx

    start = tmp_path / "start.onnx"
    export_onnx(_member(tmp_path / "p1.pt", 1), start)
    tuned = unet_from_onnx(start)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    record = {"from_onnx": str(start), "sha256": sha256_file(start)}
    for name, rec in (("tuned", record), ("other", {**record, "sha256": "0" * 64})):
        torch.save({"state_dict": tuned.state_dict(), "width": 8, "arch": "unet",
                    "training": {"command": "train --init start.onnx", "wall_seconds": 5.0,
                                 "phases": {"synthetic": rec}}}, tmp_path / f"{name}.pt")
    cks = load_members([start, tmp_path / "tuned.pt"])
    got = average([ck["state_dict"] for ck in cks], "unet", 8)
    folded = unet_from_onnx(start).state_dict()
    for k, v in tuned.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(got[k], (v + folded[k]) / 2, atol=1e-6), k
    with pytest.raises(ValueError, match="is not the network"):
        load_members([start, tmp_path / "other.pt"])
    with pytest.raises(ValueError, match="at most one exported network"):
        load_members([start, start])


def test_a_member_that_is_no_checkpoint_is_named(tmp_path: Path) -> None:
    _member(tmp_path / "a.pt", 1)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:300])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    (tmp_path / "text.onnx").write_text("not a graph")
    for name, why in (("cut.pt", "not a detector checkpoint or exported"),
                      ("other.pt", "train --checkpoint writes"),
                      ("text.onnx", "not a detector checkpoint or exported"),
                      ("gone.pt", "no such file")):
        with pytest.raises(ValueError, match=why):
            load_members([tmp_path / "a.pt", tmp_path / name])
        with pytest.raises(SystemExit, match=f"soup: .*{name}"):
            main(["--members", str(tmp_path / "a.pt"), str(tmp_path / name), "--out",
                  str(tmp_path / "out"), "--work", str(tmp_path / "work")])
