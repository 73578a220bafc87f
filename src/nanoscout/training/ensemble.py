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
import hashlib
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
    own (``onnx.compose.add_prefix``), so members may share any name but their input.
    A member that is not a readable ONNX model (truncated, not ONNX) raises ValueError naming
    it; a missing one, OSError."""
    import onnx
    import onnx.compose
    from google.protobuf.message import DecodeError
    from onnx import helper

    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    models = []
    for p in members:
        try:
            models.append(onnx.load(str(p)))
        except DecodeError as exc:
            raise ValueError(f"{p}: not a readable ONNX model ({exc})") from exc
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
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"the mean of {', '.join(map(str, members))} is not a valid ONNX "
                         f"model: {first_line}") from exc
    return model


def lead_card(first: Path) -> dict[str, Any]:
    """Return the card (a dict) beside the first member ``first``, whose post-processing the
    ensemble takes. Raises ValueError for a missing or invalid card (one that
    :class:`~nanoscout.analysis.modelcard.ModelCard` refuses) or an adapted model's (one with
    a ``base_network``, whose settings were chosen for that network alone)."""
    from nanoscout.analysis.modelcard import ModelCard
    from nanoscout.wire.errors import ModelCardError

    path = first.with_suffix(".json")
    if not path.is_file():
        raise ValueError(f"{first}: no model card beside it ({path.name})")
    try:  # its ONNX file is the first member, read on its own
        ModelCard.load(path, verify_sha256=False)
    except ModelCardError as exc:
        raise ValueError(str(exc)) from exc
    card: dict[str, Any] = json.loads(path.read_text())
    if card.get("base_network") is not None:
        raise ValueError(f"{first}: an adapted model's card (base_network) cannot lead an "
                         "ensemble")
    return card


def ensemble_card(members: list[Path], lead: dict[str, Any], onnx_path: Path, name: str,
                  version: str, *, sha256: str | None = None) -> dict[str, Any]:
    """Return the card (a dict, validated by ``ModelCard``) of the ensemble ``onnx_path``: the
    first member's card ``lead`` (:func:`lead_card`) with this file, its sha256 (``sha256``,
    or read from ``onnx_path``), ``name`` and ``version``, the members in ``training``, and
    without what belongs to the first member alone (score calibration, held-out metrics,
    timings, quantization). Raises ValueError (one line) for a card that does not validate."""
    from pydantic import ValidationError

    from nanoscout.analysis.modelcard import ModelCard, sha256_file

    card = dict(lead)
    card.update(name=name, version=version, onnx_file=onnx_path.name,
                sha256=sha256 or sha256_file(onnx_path), score_calibration=None, metrics=None,
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
    try:
        ModelCard.model_validate(card)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '<card>'}: {e['msg']}"
                             for e in exc.errors())
        raise ValueError(f"the ensemble's card would be invalid: {problems}") from None
    return card


def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (the same path, or links to one file)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist
        return False


def check_out(out: Path, members: list[Path]) -> None:
    """Raise ValueError when ``out`` (the ensemble's ONNX file; its card beside it) cannot be
    written without harm: it is a folder, or it or its card is one of the ``members`` or one of
    their cards. Reads only."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the ensemble's ONNX file "
                         "(e.g. --out DIR/detector_ensemble.onnx)")
    writes = [out, out.with_suffix(".json")]
    for m in members:
        for given in (m, m.with_suffix(".json")):
            for w in writes:
                if _same(w, given):
                    raise ValueError(f"--out {out} would replace {given} (a member or its "
                                     "card): name a new file")


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
    # everything is read and checked, the card included, before a file is written
    try:
        check_out(args.out, args.members)
        first = lead_card(args.members[0])
        model = mean_logits_graph(args.members)
        data = model.SerializeToString()
        card = ensemble_card(args.members, first, args.out,
                             args.name or first["name"] + "-ensemble", args.version,
                             sha256=hashlib.sha256(data).hexdigest())
    except (ValueError, OSError) as exc:
        print(f"nanoscout models ensemble: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)  # what onnx.save writes
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} and its card ({len(args.members)} members)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
