"""Provenance of a run: software versions, configuration, and the models with their hashes.

A run's ``_run.json`` (``RUN.json`` for CSV runs) says what made its numbers:

* ``software``: nanoscout's version, Python's and the main libraries' (:func:`software`);
* ``config``: the options of the command that wrote it (and, for ``measure``, the whole
  analysis configuration);
* ``models``: one entry per detection / classification model named in the results (the ``det``
  headers' ``model`` field, ``name:version``), with the model card's ONNX sha256 and the
  sizing error its card reports (:func:`model_entries`). Cards are plain JSON files, read here
  without importing the daemon: the command line passes the folder of shipped cards.

A ``measure --ray`` output folder holds the same record as ``_run.json``
(:mod:`nanoscout.batch.parts`); both are written by :func:`write_json`.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from nanoscout.clients.durable import replace_durably

__all__ = ["card_summary", "load_cards", "model_entries", "model_name", "software", "write_json"]

_LIBRARIES = ("numpy", "scipy", "scikit-image", "pyarrow", "onnxruntime", "onnxruntime-gpu",
              "tensorrt-cu12", "pyzmq", "rosettasciio", "tifffile")


def software() -> dict[str, Any]:
    """Versions of nanoscout, Python, the platform and the libraries that shape the numbers."""
    from nanoscout import __version__

    libs: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"nanoscout": __version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "libraries": libs}


def card_summary(card: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance of one model card: name, version, ONNX file and sha256, task, and the
    sizing error it reports (percent; synthetic held-out and, where measured, real images)."""
    metrics = card.get("metrics") or {}
    real = metrics.get("real") or {}
    sizing: dict[str, Any] = {}
    if metrics.get("median_abs_ecd_error_pct") is not None:
        sizing["synthetic_median_abs_ecd_error_pct"] = metrics["median_abs_ecd_error_pct"]
    if metrics.get("median_ecd_bias_pct") is not None:
        sizing["synthetic_median_ecd_bias_pct"] = metrics["median_ecd_bias_pct"]
    for name, m in real.items():
        if not isinstance(m, Mapping):
            continue
        for key in ("median_abs_ecd_error_pct", "d50_error_pct", "f1"):
            if m.get(key) is not None:
                sizing[f"{name}_{key}"] = m[key]
    return {"model": f"{card.get('name')}:{card.get('version')}",
            "name": card.get("name"), "version": card.get("version"),
            "task": card.get("task"), "onnx_file": card.get("onnx_file"),
            "sha256": card.get("sha256"), "sizing_error": sizing,
            "evaluation_data": metrics.get("data"),
            "real_data": {k: m.get("data") for k, m in real.items() if isinstance(m, Mapping)}}


def load_cards(folder: str | Path | None) -> dict[str, dict[str, Any]]:
    """Every model card (``*.json`` with name, version and sha256) in ``folder``, summarised
    by :func:`card_summary` and keyed ``name:version`` and ``name:version@SHA12`` (the first
    12 hex digits of its ONNX file's sha256, as results name the file that made them: an
    INT8 sibling shares its FP32 card's name and version); empty when there is no folder."""
    out: dict[str, dict[str, Any]] = {}
    if folder is None or not Path(folder).is_dir():
        return out
    for path in sorted(Path(folder).glob("*.json")):
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(card, dict) and {"name", "version", "sha256"} <= set(card):
            s = card_summary(card)
            s["card"] = path.name
            out[s["model"]] = s
            out[f"{s['model']}@{str(s['sha256'])[:12]}"] = s
    return out


def model_entries(names: Iterable[str], cards: Mapping[str, Mapping[str, Any]]
                  ) -> list[dict[str, Any]]:
    """One provenance entry per model name (``name:version``, or ``name:version@SHA12`` where
    the results named the ONNX file's hash: ``det.model_sha256``; a classifier's ``a:1+b:2``
    is split), with its card's summary where a card is known, else the name and ``"card":
    null``. A name with a hash takes only the card of that file (an INT8 sibling's, not its
    FP32 card of the same name and version)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for full in names:
        for name in str(full).split("+"):
            name = name.strip()
            if not name or name in seen:
                continue
            seen.add(name)
            model, _, sha12 = name.partition("@")
            if name in cards:
                out.append(dict(cards[name]))
            elif sha12:
                out.append({"model": model, "sha256_prefix": sha12, "card": None})
            else:
                out.append({"model": name, "card": None})
    return out


def model_name(model: str, sha256_prefix: str | None) -> str:
    """The name :func:`model_entries` looks up for a result's ``model`` (``name:version``)
    and ``model_sha256`` (None: an older daemon's result)."""
    return f"{model}@{sha256_prefix}" if sha256_prefix else model


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """(Re)write the provenance ``record`` as JSON at ``path`` atomically and durably: written
    to a hidden temporary file beside it, synced to the disk and renamed over it
    (:func:`nanoscout.clients.durable.replace_durably`), so a failed write (a full disk) leaves
    the last whole record and no temporary file, and a power cut leaves the last whole record
    or the new one, never an empty file (which made the whole run unreadable). Values JSON
    does not know are written as text."""
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
