"""One detector from several: an ONNX graph whose logits are the mean of its members' logits.

::

    python -m nanoscout.training.ensemble models/weights/detector.onnx build/seed2/detector.onnx \\
        --out build/ensemble/detector.onnx

Every member takes the same input (``image``, N x 1 x H x W, normalised as the first member's
card says) and gives logits of the same shape; the graph runs them side by side on that one
input and averages their logits, so any engine (ONNX Runtime, TensorRT, Triton) runs it as one
model, at about the members' summed engine time. The card is the first member's post-processing
(working scale, score cut, thresholds) with the new file's name and sha256, the members' files
and sha256s in ``training``, and none of what belongs to the first member alone: no score
calibration (the mean's raw scores are not the first member's: fit one on tuning sets,
``nanoscout models calibrate``, before using ``min_confidence`` with it), no held-out metrics
or timings (measure the ensemble: ``nanoscout models eval``), no quantization. An adapted
model's card (one with a ``base_network``) cannot lead an ensemble. Needs ``onnx`` (the
``train`` extra), not torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: the input every shipped detector takes and the output it gives
INPUT = "image"
OUTPUT = "logits"


def mean_logits_graph(members: list[Path]) -> Any:
    """Return the ONNX model (``onnx.ModelProto``) whose ``logits`` are the mean of the
    ``members``' logits on their shared ``image`` input. Raises ValueError when fewer than two
    are given, or a member takes another input than ``image``, gives another output than
    ``logits`` or has another opset than the first. Each member's names get a prefix of its
    own (``onnx.compose.add_prefix``), so members may share any name but their input."""
    import onnx
    import onnx.compose
    from onnx import helper

    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    models = [onnx.load(str(p)) for p in members]
    first = models[0]
    for p, m in zip(members, models, strict=True):
        ins, gives = [i.name for i in m.graph.input], [o.name for o in m.graph.output]
        if ins != [INPUT] or gives != [OUTPUT]:
            raise ValueError(f"{p}: inputs {ins} and outputs {gives}; a member takes "
                             f"'{INPUT}' and gives '{OUTPUT}' only")
        if m.opset_import != first.opset_import:
            raise ValueError(f"{p}: opset {m.opset_import} differs from {members[0]}'s "
                             f"{first.opset_import}")
    nodes: list[Any] = []
    inits: list[Any] = []
    for k, m in enumerate(models):  # every name but the shared input gets the member's prefix
        g = onnx.compose.add_prefix(m, f"m{k}/", rename_inputs=False).graph
        nodes += g.node
        inits += g.initializer
    nodes.append(helper.make_node("Mean", [f"m{k}/{OUTPUT}" for k in range(len(models))],
                                  [OUTPUT], name="mean"))
    graph = helper.make_graph(nodes, "mean_logits", [first.graph.input[0]],
                              [first.graph.output[0]], inits)
    model = helper.make_model(graph, opset_imports=list(first.opset_import),
                              producer_name="nanoscout.training.ensemble")
    model.ir_version = first.ir_version
    onnx.checker.check_model(model)
    return model


def lead_card(first: Path) -> dict[str, Any]:
    """Return the card (a dict) beside the first member ``first``, whose post-processing the
    ensemble takes. Raises ValueError for a missing card or an adapted model's (one with a
    ``base_network``, whose settings were chosen for that network alone)."""
    path = first.with_suffix(".json")
    if not path.is_file():
        raise ValueError(f"{first}: no model card beside it ({path.name})")
    card: dict[str, Any] = json.loads(path.read_text())
    if card.get("base_network") is not None:
        raise ValueError(f"{first}: an adapted model's card (base_network) cannot lead an "
                         "ensemble")
    return card


def ensemble_card(members: list[Path], lead: dict[str, Any], onnx_path: Path, name: str,
                  version: str) -> dict[str, Any]:
    """Return the card (a dict, validated by ``ModelCard``) of the ensemble ``onnx_path``: the
    first member's card ``lead`` (:func:`lead_card`) with this file, its sha256, ``name`` and
    ``version``, the members in ``training``, and without what belongs to the first member
    alone (score calibration, held-out metrics, timings, quantization)."""
    from nanoscout.analysis.modelcard import ModelCard, sha256_file

    card = dict(lead)
    card.update(name=name, version=version, onnx_file=onnx_path.name,
                sha256=sha256_file(onnx_path), score_calibration=None, metrics=None,
                evaluation={}, timings_ms={}, quantization=None,
                created=datetime.now(UTC).isoformat(timespec="seconds"))
    card["training"] = {
        **card.get("training", {}),
        "ensemble": {
            "how": "mean of the members' logits on one input, one ONNX graph "
                   "(nanoscout.training.ensemble)",
            "members": [{"file": str(p), "sha256": sha256_file(p)} for p in members],
        },
    }
    card["notes"] = (f"Mean of {len(members)} detectors' logits ({', '.join(p.name for p in members)}),"
                     f" with the first's post-processing. " + card.get("notes", ""))
    ModelCard.model_validate(card)
    return card


def main(argv: list[str] | None = None) -> int:
    """Command line: write the ensemble's ONNX file and its card beside it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("members", type=Path, nargs="+",
                    help="member ONNX files; the card beside the first gives the "
                         "post-processing")
    ap.add_argument("--out", type=Path, required=True, help="the ensemble's ONNX file")
    ap.add_argument("--name", default=None, help="card name (default: the first's + '-ensemble')")
    ap.add_argument("--version", default="1.0", help="card version")
    args = ap.parse_args(argv)
    import onnx

    try:
        first = lead_card(args.members[0])
        model = mean_logits_graph(args.members)
    except (ValueError, OSError) as exc:
        print(f"nanoscout models ensemble: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out))
    card = ensemble_card(args.members, first, args.out,
                         args.name or first["name"] + "-ensemble", args.version)
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} and its card ({len(args.members)} members)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
