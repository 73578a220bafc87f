"""What the Triton hop costs per 1024² frame: local ONNX Runtime versus a Triton server on this host.

Usage::

    python benchmarks/triton_hop.py --out benchmarks/results/triton_hop.json
    python benchmarks/triton_hop.py --rounds 5 --out /tmp/hop.json

The server is the ``nvidia-pytriton`` wheel's ``tritonserver`` from ``.venv-triton`` (``make
triton-env``; see ``tests/triton_server.py``), serving the shipped detector through the
``--runtime python`` repository (ONNX Runtime in the server's Python stub, 1 thread, as the
local engine here): the only Triton build that runs on this CPU-only machine.

Measured, interleaved round by round so that other load on the machine hits every variant alike:

* ``infer``: one ``engine.infer`` of a (1, 1, 1024, 1024) float32 tensor (the detector's input for
  a 1024² frame at working scale 1): local ONNX Runtime, Triton over gRPC, Triton over system
  shared memory. For the Triton variants the server's own statistics (queue, compute input,
  compute infer, compute output, per request) are read before and after each variant, and
  ``hop_ms`` = client wall time − the server's time for the request: what the network call
  itself adds (serialisation, gRPC, copies, the client library);
* ``frame``: ``Pipeline.process`` (offline pipeline, no classifier) of a synthetic 1024² TEM
  frame (uint16, 0.5 nm/px) with each engine: the whole per-frame cost, including the
  detector's working-scale passes (several engine calls per frame).

The server-side time of the Python stub (its own shared-memory IPC with the server process) is
part of the server's ``compute_infer``; a production server's ``onnxruntime`` backend has no stub.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.latency import machine_info  # noqa: E402
from nanoscout.analysis.frame import Frame  # noqa: E402
from nanoscout.analysis.modelcard import shipped_model_dir  # noqa: E402
from nanoscout.daemon.app import build_pipeline  # noqa: E402
from nanoscout.daemon.config import load_config  # noqa: E402
from nanoscout.engines import create_engine  # noqa: E402
from nanoscout.engines.triton import TritonEngine, TritonOptions  # noqa: E402
from nanoscout.engines.triton_repository import write_repository  # noqa: E402
from nanoscout.sim.synthetic import Specimen, SpecimenConfig  # noqa: E402
from tests.triton_server import find_dist, start_triton  # noqa: E402

SIZE = 1024


def _summary(ms: list[float]) -> dict[str, float | int]:
    a = np.asarray(ms)
    return {"n": int(a.size), "median": round(float(np.median(a)), 2),
            "p90": round(float(np.percentile(a, 90)), 2), "mean": round(float(a.mean()), 2),
            "min": round(float(a.min()), 2)}


def _server_ns(client: Any, model: str) -> dict[str, int]:
    """Cumulative server-side ns and request count of ``model`` (Triton statistics)."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inf = stats["inference_stats"]
    out = {"count": int(inf["success"].get("count", 0))}
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        out[key] = int(inf[key].get("ns", 0))
    return out


def _settled(client: Any, count: int, timeout_s: float = 5.0) -> dict[str, int]:
    """The statistics once they count ``count`` requests (Triton records a request's
    statistics just after answering it, so an immediate read can miss the last one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _server_ns(client, "detector")
        if stats["count"] >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.005)  # allowed: polling the server's statistics, which cannot notify


def run(args: argparse.Namespace) -> dict[str, Any]:
    dist = find_dist()
    if isinstance(dist, str):
        raise SystemExit(dist)
    work = Path(tempfile.mkdtemp(prefix="triton-hop-"))
    model = shipped_model_dir() / "detector.onnx"
    write_repository([model], work / "repo", runtime="python", tensorrt="never", threads=1)
    server = start_triton(dist, work / "repo", work)
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        engines = {
            "local": create_engine(model, "cpu", threads=1),
            "triton_grpc": TritonEngine(TritonOptions(server.url, "detector", shared_memory="off")),
            "triton_shm": TritonEngine(TritonOptions(server.url, "detector",
                                                     shared_memory="system")),
        }
        x = np.random.default_rng(0).random((1, 1, SIZE, SIZE), dtype=np.float32)
        ref = engines["local"].infer({"image": x})["logits"]
        identical = {}
        for name, e in engines.items():  # warm-up (first request of a shape) + identity
            identical[name] = bool(np.array_equal(e.infer({"image": x})["logits"], ref))
        wall: dict[str, list[float]] = {n: [] for n in engines}
        server_ms: dict[str, list[float]] = {n: [] for n in engines if n != "local"}
        for _ in range(args.rounds):
            for name, e in engines.items():
                before = _server_ns(client, "detector") if name != "local" else None
                t0 = time.perf_counter()
                for _ in range(args.per_round):
                    e.infer({"image": x})
                dt = (time.perf_counter() - t0) * 1e3 / args.per_round
                wall[name].append(dt)
                if before is not None:
                    after = _settled(client, before["count"] + args.per_round)
                    n = after["count"] - before["count"]
                    ns = sum(after[k] - before[k] for k in after if k != "count")
                    server_ms[name].append(ns / 1e6 / max(n, 1))
        infer: dict[str, Any] = {n: {"wall_ms": _summary(v)} for n, v in wall.items()}
        local = statistics.median(wall["local"])
        for name, srv in server_ms.items():
            hop = [w - s for w, s in zip(wall[name], srv)]
            infer[name].update({
                "server_ms": _summary(srv), "hop_ms": _summary(hop),
                "overhead_vs_local_ms": round(statistics.median(wall[name]) - local, 2),
                "overhead_vs_local_ratio": round(statistics.median(wall[name]) / local - 1, 3),
            })

        cfg = replace(SpecimenConfig(), shape=(SIZE, SIZE), dtype="uint16", pixel_size_nm=0.5)
        frame = Specimen.generate(cfg, 0).acquire(np.random.default_rng(1)).image
        only_detector = {"classify.enabled": False, "engine.modality_models": {}}
        pipelines = {"local": build_pipeline(load_config(None, {
            "engine.backend": "cpu", "engine.threads": 1, **only_detector}), offline=True)}
        for name, shm in (("triton_grpc", "off"), ("triton_shm", "system")):
            pipelines[name] = build_pipeline(load_config(None, {
                "engine.backend": "triton", "engine.triton.url": server.url,
                "engine.triton.shared_memory": shm, **only_detector}), offline=True)
        image = Frame.from_image(frame, pixel_size_nm=0.5)
        tables = {n: p.process(image).table for n, p in pipelines.items()}
        frame_ms: dict[str, list[float]] = {n: [] for n in pipelines}
        engine_ms: dict[str, list[float]] = {n: [] for n in pipelines}
        for _ in range(args.rounds):
            for name, p in pipelines.items():
                t0 = time.perf_counter()
                a = p.process(image)
                frame_ms[name].append((time.perf_counter() - t0) * 1e3)
                engine_ms[name].append(a.stage_ms["engine"] + a.stage_ms.get("scale", 0.0))
        frame_block: dict[str, Any] = {}
        for name in pipelines:
            frame_block[name] = {"wall_ms": _summary(frame_ms[name]),
                                 "engine_and_scale_ms": _summary(engine_ms[name]),
                                 "particles": int(len(tables[name])),
                                 "identical_to_local": tables[name].tobytes()
                                 == tables["local"].tobytes()}
            if name != "local":
                frame_block[name]["overhead_vs_local_ms"] = round(
                    statistics.median(frame_ms[name]) - statistics.median(frame_ms["local"]), 2)
        for p in pipelines.values():
            p.close()
        for e in engines.values():
            e.close()
    finally:
        client.close()
        server.stop()
    return {
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "server": {"binary": "tritonserver of nvidia-pytriton (Triton 2.51)",
                   "repository": "export-triton --runtime python (ONNX Runtime in the Python "
                                 "stub, 1 intra-op thread)",
                   "url": server.url},
        "tensor": [1, 1, SIZE, SIZE],
        "rounds": args.rounds, "per_round": args.per_round,
        "identical_outputs": identical,
        "infer": infer,
        "frame": frame_block,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for name, block in report["infer"].items():
        extra = (f", server {block['server_ms']['median']} ms, hop {block['hop_ms']['median']} ms"
                 if "hop_ms" in block else "")
        print(f"infer {name}: {block['wall_ms']['median']} ms{extra}")
    for name, block in report["frame"].items():
        print(f"frame {name}: {block['wall_ms']['median']} ms, identical "
              f"{block['identical_to_local']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
