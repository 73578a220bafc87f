"""Weight averaging ("model soup"): one detector network whose weights are the mean of several
phase-2 runs that started from one phase 1.

::

    # the whole recipe, one command: phase 1, the members' phase 2, the average, the card
    python -m nanoscout.training.soup --variant stem --out build/soup
    # or average members trained already (train --init the same phase-1 checkpoint)
    python -m nanoscout.training.soup --variant stem --out DIR --members A.pt B.pt C.pt

Any other option goes to every ``train`` command of the recipe (``--steps 100
--finetune-steps 100`` for a quick check).

Networks fine-tuned from one starting point stay in one basin of the loss, so the mean of their
weights is a network of its own, often better than each of them and less dependent on one run's
luck (Wortsman et al. 2022, "Model soups"; Cha et al. 2021, SWAD, on data unlike the training
data). It costs one network's engine time, where an ensemble
(:mod:`nanoscout.training.ensemble`) costs the members' summed time. Every floating-point
tensor of the state dict is averaged (``torch.optim.swa_utils.AveragedModel``), the BatchNorm
running statistics included (chosen against re-estimating them on 200 training batches, on the
STEM tuning material); integer buffers (``num_batches_tracked``) are the first member's. One
exported detector may be a member too: the network the other members were fine-tuned from with
``train --init X.onnx`` (the start and its fine-tunings, "WiSE-FT").

The recipe's members differ in what they see, not in their seed: ``plain`` is the variant's own
phase 2; ``low-dose`` takes half of its real crops to a low dose first (``train --low-dose-p
0.5``); ``masks`` trains on the STEM boxes' pseudo-masks drawn by the ``plain`` member
(:mod:`nanoscout.training.pseudo_masks`) instead of their inscribed ellipses. Each member is
``python -m nanoscout.training.train --init <phase 1> ...``, run in this process one after the
other, its checkpoint, ONNX file and card kept under ``--work``.

Measured (``benchmarks/results/weight_averaging.json``), not shipped: on the STEM tuning
material the soup of three networks that never saw it beat each of them (Pt F1 0.617 -> 0.660 at
the same working scales), but the full recipe's soup lost held-out Pd (0.593 -> 0.551), and the
general detector averaged with its own continuation lost its synthetic tuning frames.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nanoscout.training.export import VARIANTS, export_onnx, write_card
from nanoscout.training.unet_deep import build_network

__all__ = ["ARMS", "average", "load_members", "main", "member_args"]

#: the recipe's members: name -> the ``train`` options it adds to the variant's phase 2
#: (``masks``: the pseudo-masks folder is filled in from the ``plain`` member)
ARMS: dict[str, tuple[str, ...]] = {
    "plain": ("--low-dose-p", "0.0"),
    "low-dose": ("--low-dose-p", "0.5"),
    "masks": ("--low-dose-p", "0.0", "--stem-masks"),
}
DEFAULT_ARMS = ("plain", "low-dose", "masks")


def _start(ck: dict[str, Any]) -> Any:
    """A checkpoint's start: its training record's synthetic phase (phase 1's summary and the
    checkpoint or exported network it was fine-tuned from)."""
    return ck.get("training", {}).get("phases", {}).get("synthetic")


def _from_onnx(path: Path) -> dict[str, Any]:
    """An exported detector (BatchNorms folded) as a checkpoint-like member: the start of runs
    fine-tuned from it with ``train --init`` (their BatchNorms frozen as folded)."""
    from nanoscout.analysis.modelcard import sha256_file
    from nanoscout.training.onnx_weights import unet_from_onnx

    net = unet_from_onnx(path)
    return {"state_dict": net.state_dict(), "width": net.width, "arch": "unet",
            "onnx_sha256": sha256_file(path),
            "training": {"command": f"the exported network {path}", "phases": {}}}


def _load(path: Path) -> dict[str, Any]:
    """One member, checkpoint or exported detector; ValueError names a file that is neither."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        ck = _from_onnx(path) if path.suffix == ".onnx" else \
            torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated file, another format: torch and onnx raise many kinds
        raise ValueError(f"{path}: not a detector checkpoint or exported detector "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict) \
            or "width" not in ck:
        raise ValueError(f"{path}: not a detector checkpoint (train --checkpoint writes "
                         "state_dict, width and training)")
    return ck


def load_members(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Load the members: checkpoints (``train --checkpoint``) and at most one exported
    detector (``.onnx``) that every checkpoint was fine-tuned from (``train --init X.onnx``:
    the start and its fine-tunings, "WiSE-FT"). Raises ValueError when fewer than two are
    given, or they differ in architecture, width, tensor names or shapes, or in their start
    (the training record's ``synthetic`` phase: the phase 1 or exported network they were
    fine-tuned from): networks of different starts average to neither."""
    if len(paths) < 2:
        raise ValueError(f"a soup needs at least two members, got {len(paths)}")
    cks = [_load(p) for p in paths]
    exported = [(p, ck) for p, ck in zip(paths, cks, strict=True) if "onnx_sha256" in ck]
    trained = [(p, ck) for p, ck in zip(paths, cks, strict=True) if "onnx_sha256" not in ck]
    if len(exported) > 1 or not trained:
        raise ValueError("at most one exported network (the start of the others) can be a "
                         f"member, got {len(exported)} of {len(paths)}")
    (p0, first), start = trained[0], _start(trained[0][1])
    for p, ck in zip(paths, cks, strict=True):
        for key in ("arch", "width"):
            if ck.get(key) != first.get(key):
                raise ValueError(f"{p}: {key} {ck.get(key)!r}, {p0}: {first.get(key)!r}")
        a, b = first["state_dict"], ck["state_dict"]
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError(f"{p}: its tensors differ from {p0}'s in names or shapes")
        if "onnx_sha256" not in ck and (start is None or _start(ck) != start):
            raise ValueError(f"{p} and {p0} did not start from one phase 1 (their training "
                             "records' synthetic phases differ); only fine-tuned runs of one "
                             "start can be averaged")
    for p, ck in exported:
        if not isinstance(start, dict) or start.get("sha256") != ck["onnx_sha256"]:
            raise ValueError(f"{p} is not the network {p0} was fine-tuned from (train --init "
                             f"{p} records its sha256)")
    return cks


def average(state_dicts: Sequence[dict[str, torch.Tensor]], arch: str, width: int
            ) -> dict[str, torch.Tensor]:
    """Return the state dict whose floating-point tensors are the element-wise mean of
    ``state_dicts``' (networks ``arch`` of base ``width``), the BatchNorm running statistics
    included (``torch.optim.swa_utils.AveragedModel`` with ``use_buffers``), and whose integer
    buffers (``num_batches_tracked``) are the first's."""
    from torch.optim.swa_utils import AveragedModel

    nets = []
    for sd in state_dicts:
        net = build_network(arch, width)
        net.load_state_dict(sd)
        nets.append(net)
    averaged = AveragedModel(nets[0], use_buffers=True)
    for net in nets:  # the first update copies, each later one joins the equal-weight mean
        averaged.update_parameters(net)
    out = {k: v.detach().clone() for k, v in averaged.module.state_dict().items()}
    for k, v in state_dicts[0].items():
        if not v.dtype.is_floating_point:
            out[k] = v.clone()
    return out


def member_args(variant: str, arm: str, init: Path, work: Path, threads: int,
                masks: Path | None = None) -> list[str]:
    """The ``train`` command line of one member (``arm`` of :data:`ARMS`) fine-tuned from
    phase-1 checkpoint ``init``; ``masks``: the pseudo-masks folder the ``masks`` arm takes."""
    if arm not in ARMS:
        raise ValueError(f"unknown member {arm!r}: one of {sorted(ARMS)}")
    extra = list(ARMS[arm])
    if arm == "masks":
        if masks is None:
            raise ValueError("the masks member needs the pseudo-masks folder")
        extra.append(str(masks))
    return ["--variant", variant, "--init", str(init), *extra, *_step_args(work / arm, threads)]


def _step_args(out: Path, threads: int) -> list[str]:
    """The ``train`` options every step of the recipe shares: no evaluation or timing in its
    card (the soup's card has them), its files in ``out`` (checkpoint ``detector.pt``)."""
    return ["--no-real-eval", "--eval-n", "0", "--no-timing", "--threads", str(threads),
            "--out", str(out), "--checkpoint", str(out / "detector.pt")]


def _recipe(variant: str, arms: Sequence[str], work: Path, init: Path | None,
            threads: int, extra: Sequence[str] = ()) -> list[Path]:
    """Train phase 1 (unless ``init``) and every member, each ``train`` command with ``extra``
    options first (the recipe's own options, later, win); return the members' checkpoints."""
    from nanoscout.training import train
    from nanoscout.training.pseudo_masks import write_masks

    if "masks" in arms and "plain" not in arms[: list(arms).index("masks")]:
        raise ValueError("the masks member's outlines are drawn by the plain member: "
                         "list plain before masks")
    if init is None:
        init = work / "phase1" / "detector.pt"
        train.main([*extra, "--variant", variant, "--finetune-steps", "0",
                    *_step_args(init.parent, threads)])
    file = VARIANTS[variant].file
    paths = []
    for arm in arms:
        masks = None
        if arm == "masks":
            masks = work / "pseudo_masks"
            write_masks(work / "plain" / file, masks, threads=threads)
        train.main([*extra, *member_args(variant, arm, init, work, threads, masks)])
        paths.append(work / arm / "detector.pt")
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: train the members (or take ``--members``), average, export, write the card."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="stem")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder of the averaged detector's ONNX file and card (the shipped "
                         "models/weights replaces the shipped detector of --variant)")
    ap.add_argument("--members", type=Path, nargs="+", default=None,
                    help="average these checkpoints instead of training the recipe's members")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help=f"the recipe's members, in order (of {', '.join(ARMS)})")
    ap.add_argument("--work", type=Path, default=Path("runs/soup"),
                    help="folder of phase 1, the members (checkpoints, ONNX files, cards) and "
                         "the average's checkpoint (soup.pt)")
    ap.add_argument("--init", type=Path, default=None,
                    help="a phase-1 checkpoint to start the members from (default: train one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=20,
                    help="held-out synthetic frames evaluated for the card")
    ap.add_argument("--no-real-eval", action="store_true",
                    help="skip the real validation sets in the card's metrics")
    ap.add_argument("--no-timing", action="store_true", help="card without engine timings")
    args, extra = ap.parse_known_args(argv)
    if extra and args.members is not None:
        ap.error(f"unrecognized arguments: {' '.join(extra)} (train options go to the "
                 "recipe's members, not to --members)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        if args.members is not None:
            paths = list(args.members)
        else:
            arms = [a for a in args.arms.split(",") if a]
            paths = _recipe(args.variant, arms, args.work, args.init, args.threads, extra)
        cks = load_members(paths)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"soup: {exc}") from None
    first = next(ck for ck in cks if "onnx_sha256" not in ck)  # a trained member's record
    arch, width = first.get("arch", "unet"), int(first["width"])
    model = build_network(arch, width)
    model.load_state_dict(average([ck["state_dict"] for ck in cks], arch, width))
    model.eval()
    onnx_path = args.out / VARIANTS[args.variant].file
    verify = export_onnx(model, onnx_path)
    members = [{"checkpoint": str(p), "command": ck["training"].get("command", ""),
                "wall_seconds": ck["training"].get("wall_seconds"),
                "real": ck["training"].get("phases", {}).get("real")}
               for p, ck in zip(paths, cks, strict=True)]
    training = {
        "command": " ".join(["python -m nanoscout.training.soup",
                             *(sys.argv[1:] if argv is None else argv)]),
        "args": {"seed": first["training"].get("args", {}).get("seed", "")},
        # the recipe: this command's time; averaging alone: the members' training time
        "wall_seconds": round(time.perf_counter() - t0 if args.members is None else
                              sum(float(m["wall_seconds"] or 0.0) for m in members), 1),
        "onnx_max_abs_diff_vs_torch": verify["max_abs_diff"],
        "phases": {"synthetic": first["training"]["phases"]["synthetic"]},
        "soup": {"members": members, "batchnorm": "running statistics averaged"},
    }
    args.work.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "width": first["width"],
                "arch": first.get("arch", "unet"), "training": training}, args.work / "soup.pt")
    write_card(onnx_path, training=training, width=int(first["width"]), eval_n=args.eval_n,
               real=not args.no_real_eval, timing=not args.no_timing, variant=args.variant)
    print(f"averaged {len(paths)} members -> {onnx_path}", flush=True)


if __name__ == "__main__":
    main()
