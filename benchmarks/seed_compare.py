"""The shipped pipeline against a pipeline built the way the E-TEM prior work describes it, on
the CPU, at 1024², measured side by side in one run.

Usage::

    python benchmarks/seed_compare.py --out benchmarks/results/seed_compare.json
    python benchmarks/seed_compare.py --seed-frames 2 --seconds 10 --out /tmp/seed.json   # quick

**Seed-style pipeline** (eager PyTorch, random weights, timed for speed only; it is never scored):
a U-Net with a ResNet-34 encoder (the usual segmentation_models layout: stem conv 7x7/2 +
max-pool, residual stages of 3, 4, 6, 3 basic blocks with 64-512 channels, a decoder of five
up-sampling blocks with 256, 128, 64, 32, 16 channels and skip connections; the grey frame
repeated into three channels, as for an ImageNet encoder) segments the whole frame; its mask is
labelled into particles (``scipy.ndimage.label``) and every particle's crop (its bounding box
plus 25 %, resized to 64x64) goes, one particle at a time, through a FeatureNet (four conv-BN-ReLU
blocks of 32-256 channels with pooling, global average pooling, a 128-d embedding); the
particles are measured with ``skimage.measure.regionprops``. With random weights the network's
mask would be noise, so the per-particle stages run on the frame's true particles (the mask a
trained network would give): the particle count, and with it the per-particle cost, is the real
frame's. Torch uses ``--threads`` threads, under ``torch.inference_mode``.

**Shipped pipeline, end to end through the daemon**: ``nanoscout serve`` in its own process,
default configuration (``precision = "auto"``: INT8 where its parity passed, classifier and lens
on every frame), fed by a PUB publisher at a sustainable rate over loopback ZeroMQ; the time is
the subscriber's receive time − acquisition time of each ``det`` result (``latency.py``'s
``live_sustainable`` phase). The same is measured with ``--precision fp32`` daemons for
comparison (``--precisions``).

The JSON holds both timings (p50, all runs), the ratio seed p50 / daemon p50 per precision, the
target (>= 80x), and the INT8 siblings' recorded accuracy parity (``nanoscout models quantize``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.latency import (  # noqa: E402
    _write,
    machine_info,
    measure_live,
    render_exposures,
    start_daemon,
    summary,
)

TARGET_RATIO = 80.0
SIZE = 1024


# --------------------------------------------------------------------------- seed-style pipeline

def build_seed_models(threads: int) -> tuple[Any, Any]:
    """Return (ResNet-34 U-Net, FeatureNet) in eval mode with random weights (seeded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(threads)

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    def stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(Basic(cin, cout, stride), *[Basic(cout, cout, 1) for _ in range(n - 1)])

    def cbr(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    class Up(nn.Module):
        def __init__(self, cin: int, skip: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Sequential(cbr(cin + skip, cout), cbr(cout, cout))

        def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            return self.conv(x if skip is None else torch.cat([x, skip], 1))

    class ResNet34UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True))
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.l1, self.l2 = stage(64, 64, 3, 1), stage(64, 128, 4, 2)
            self.l3, self.l4 = stage(128, 256, 6, 2), stage(256, 512, 3, 2)
            self.d4, self.d3 = Up(512, 256, 256), Up(256, 128, 128)
            self.d2, self.d1 = Up(128, 64, 64), Up(64, 64, 32)
            self.d0 = Up(32, 0, 16)
            self.head = nn.Conv2d(16, 1, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s0 = self.stem(x)
            s1 = self.l1(self.pool(s0))
            s2 = self.l2(s1)
            s3 = self.l3(s2)
            s4 = self.l4(s3)
            y = self.d4(s4, s3)
            y = self.d3(y, s2)
            y = self.d2(y, s1)
            y = self.d1(y, s0)
            return self.head(self.d0(y, None))

    class FeatureNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(cbr(1, 32), nn.MaxPool2d(2), cbr(32, 64), nn.MaxPool2d(2),
                                      cbr(64, 128), nn.MaxPool2d(2), cbr(128, 256),
                                      nn.AdaptiveAvgPool2d(1))
            self.fc = nn.Linear(256, 128)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x).flatten(1))

    return ResNet34UNet().eval(), FeatureNet().eval()


def seed_style(frame: np.ndarray, truth: np.ndarray, unet: Any, featnet: Any) -> dict[str, float]:
    """Run the seed-style pipeline on one frame; returns stage times (ms) and the particle count."""
    import torch
    from scipy import ndimage as ndi
    from skimage.measure import regionprops
    from skimage.transform import resize

    t0 = time.perf_counter()
    x = frame.astype(np.float32)
    lo, hi = np.percentile(x, (0.5, 99.5))
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    with torch.inference_mode():
        t = torch.from_numpy(x)[None, None].repeat(1, 3, 1, 1)
        prob = torch.sigmoid(unet(t))[0, 0].numpy()
    t1 = time.perf_counter()
    # a trained network's mask: the frame's true particles (random weights give noise)
    mask = truth > 0
    labels, n = ndi.label(mask)
    props = regionprops(labels, intensity_image=prob)
    t2 = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for p in props:  # one particle at a time
            r0, c0, r1, c1 = p.bbox
            pad_r, pad_c = max(1, (r1 - r0) // 4), max(1, (c1 - c0) // 4)
            crop = x[max(0, r0 - pad_r):r1 + pad_r, max(0, c0 - pad_c):c1 + pad_c]
            crop = resize(crop, (64, 64), order=1, anti_aliasing=False).astype(np.float32)
            feats.append(featnet(torch.from_numpy(crop)[None, None])[0].numpy())
    t3 = time.perf_counter()
    _ = [(p.area, p.equivalent_diameter_area, p.eccentricity, p.solidity) for p in props]
    t4 = time.perf_counter()
    return {"unet_ms": (t1 - t0) * 1e3, "label_ms": (t2 - t1) * 1e3,
            "featurenet_ms": (t3 - t2) * 1e3, "measure_ms": (t4 - t3) * 1e3,
            "total_ms": (t4 - t0) * 1e3, "particles": float(n)}


def render(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint16 frame, true labels) pairs of one drifting TEM specimen, 1024², 0.5 nm/px (the
    latency benchmark's frames)."""
    return [(np.ascontiguousarray(e.image), e.labels) for e in render_exposures(SIZE, n, seed)]


def int8_parity() -> dict[str, Any]:
    """The recorded accuracy parity of the shipped INT8 siblings (their cards)."""
    from nanoscout.analysis.modelcard import ModelCard, quantized_sibling, shipped_model_dir

    out: dict[str, Any] = {}
    for name in ("detector", "detector_stem", "classifier", "lens"):
        sib = quantized_sibling(shipped_model_dir() / f"{name}.onnx").with_suffix(".json")
        if sib.is_file():
            q = ModelCard.load(sib).quantization
            if q is not None:
                out[name] = {"passed": q.passed, "max_loss": q.max_loss,
                             "losses": {k: v.get("loss") for k, v in q.parity.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run both pipelines; write the JSON; 0 when everything was measured."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed-frames", type=int, default=4, help="frames through the seed-style pipeline")
    p.add_argument("--seconds", type=float, default=20.0, help="each daemon phase, s")
    p.add_argument("--precisions", nargs="+", default=["auto", "fp32"],
                   help="daemon precisions measured (engine.precision)")
    p.add_argument("--rate", type=float, default=None,
                   help="frames/s offered to the daemon (default: 0.8 / its bare detection time)")
    p.add_argument("--seed", type=int, default=12345 + SIZE)
    args = p.parse_args(argv)
    t_run = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "seed-style pipeline (ResNet-34 U-Net + per-particle FeatureNet, eager "
                     "torch, random weights) vs nanoscout end to end through the daemon, 1024², CPU",
        "command": shlex.join([sys.executable, *sys.argv]), "machine": machine_info(),
        "config": {"size": SIZE, "threads": args.threads, "seed_frames": args.seed_frames,
                   "seconds": args.seconds, "precisions": args.precisions},
        "errors": [],
    }
    print("rendering frames ...", flush=True)
    pairs = render(max(4, args.seed_frames), args.seed)
    frames = [f for f, _ in pairs]

    daemons: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nanoscout-seed-") as tmp:
        for precision in args.precisions:
            ns = argparse.Namespace(health_interval=0.25, threads=args.threads, backend="cpu",
                                    config=None, model=None, seconds=args.seconds,
                                    drain_timeout=60.0, precision=precision)
            log_dir = Path(tmp) / precision
            log_dir.mkdir()
            try:
                d = start_daemon("live", ns, log_dir)
                rate = args.rate or 2.0
                if args.rate is None:  # a short probe for a sustainable rate
                    probe = measure_live(d, frames, f"probe-{precision}", 1.0,
                                         argparse.Namespace(**{**vars(ns), "seconds": 4.0}))
                    lat = probe["latency_done_ms"]["p50"] or 500.0
                    rate = min(8.0, 0.6 * 1e3 / lat)
                res = measure_live(d, frames, f"seed-{precision}", rate, ns)
                res["engine_precision"] = precision
                daemons[precision] = res
                code = d.stop()
                if code != 0:
                    report["errors"].append(f"{precision} daemon exited with {code}")
            except Exception as exc:  # recorded; the seed side still runs
                report["errors"].append(f"daemon {precision}: {exc!r}")
            print(f"daemon {precision}: {daemons.get(precision, {}).get('latency_subscriber_ms')}",
                  flush=True)

    print("seed-style pipeline ...", flush=True)
    unet, featnet = build_seed_models(args.threads)
    seed_style(frames[0][:256, :256], pairs[0][1][:256, :256], unet, featnet)  # warm-up
    runs = [seed_style(f, lab, unet, featnet) for f, lab in pairs[:args.seed_frames]]
    seed = {k: summary([r[k] for r in runs]) for k in runs[0]}
    print(f"seed-style total p50 {seed['total_ms']['p50']} ms", flush=True)

    ratios = {}
    for precision, res in daemons.items():
        e2e = (res.get("latency_subscriber_ms") or {}).get("p50")
        ratios[precision] = round(seed["total_ms"]["p50"] / e2e, 2) if e2e else None
    main_ratio = ratios.get(args.precisions[0])
    report.update({
        "seed_style": {"stages_ms": seed, "runs": runs},
        "nanoscout_daemon": daemons,
        "ratio_seed_over_daemon_p50": ratios,
        "int8_parity": int8_parity(),
        "target": {"ratio": f">= {TARGET_RATIO:g}", "measured": main_ratio,
                   "precision": args.precisions[0],
                   "pass": main_ratio is not None and main_ratio >= TARGET_RATIO},
        "duration_s": round(time.monotonic() - t_run, 1),
    })
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(args.out, report)
    print(json.dumps({"ratios": ratios, "target": report["target"]}, indent=1))
    print(f"wrote {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
