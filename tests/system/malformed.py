"""Generated malformed ``frame`` messages: every one must be rejected (and counted) by a daemon.

Each generator builds one message that is invalid by construction (so none can slip through as
a frame), drawn from a seeded ``random.Random``: garbage parts, wrong part counts, unknown
topics, bytes that are not msgpack or not a map, bad versions, header fields that are
missing, of the wrong type, out of range or impossible (negative / zero / huge / overflowing
shapes, unsupported dtypes, absurd calibrations, sources with newlines, int64 overflows,
non-finite floats, oversized meta), payloads of the wrong length, frames above the size
limit, and pixels that cannot be analysed (NaN, infinity, ±1e308).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import msgpack
import numpy as np

from nanoscout.wire.protocol import encode_frame, frame_header

__all__ = ["GENERATORS", "malformed", "malformed_results", "valid_oddities"]

Parts = list[bytes]


def _header(rng: random.Random, shape: tuple[int, int] = (8, 8), dtype: str = "<u2") -> dict:
    return {"v": [1, 3], "source": f"fz{rng.randrange(4)}", "seq": rng.randrange(1 << 20),
            "t_acq_ns": time.time_ns(), "shape": list(shape), "dtype": dtype,
            "pixel_size_nm": 0.5, "meta": {}}


def _pack(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def _pixels(shape: tuple[int, int], dtype: str = "<u2") -> bytes:
    return bytes(math.prod(shape) * np.dtype(dtype).itemsize)


def garbage_parts(rng: random.Random) -> Parts:
    n = rng.choice([1, 2, 4, 5, 7])
    return [rng.randbytes(rng.randrange(0, 64)) for _ in range(n)]


def wrong_part_count(rng: random.Random) -> Parts:
    h = _header(rng)
    return rng.choice([[b"frame"], [b"frame", _pack(h)],
                       [b"frame", _pack(h), _pixels((8, 8)), b"extra"]])


def bad_topic(rng: random.Random) -> Parts:
    topic = rng.choice([b"", b"frames", b"frame.x", b"det.sim", b"\xff\xfe", rng.randbytes(9)])
    return [topic, _pack(_header(rng)), _pixels((8, 8))]


def not_msgpack(rng: random.Random) -> Parts:
    raw = rng.choice([b"\xc1", b"\xc1\xff\x00garbage", b"\x92\x01", rng.randbytes(1) + b"\xc1"])
    return [b"frame", raw, _pixels((8, 8))]


def not_a_map(rng: random.Random) -> Parts:
    return [b"frame", msgpack.packb(rng.choice([[1, 2], 7, "frame", None, 1.5, b"x"])),
            _pixels((8, 8))]


def bad_version(rng: random.Random) -> Parts:
    h = _header(rng)
    v = rng.choice([[2, 0], [0, 9], [1], [1, 2, 3], "1.3", None, [True, 1], [1.0, 3]])
    if v is None:
        del h["v"]
    else:
        h["v"] = v
    return [b"frame", _pack(h), _pixels((8, 8))]


def bad_shape(rng: random.Random) -> Parts:
    h = _header(rng)
    h["shape"] = rng.choice([[-1, -5], [-1, -1], [2**62 + 1, 4], [0, 8], [8, 0], [8], [8, 8, 1],
                             [65537, 1], [2**63 - 1, 2**63 - 1], [8.0, 8], ["8", "8"],
                             [True, 8], None, "8x8"])
    return [b"frame", _pack(h), _pixels((8, 8))]


def bad_dtype(rng: random.Random) -> Parts:
    h = _header(rng)
    h["dtype"] = rng.choice(["c8", "<c16", "|b1", "O", "<M8[ns]", "float16", "<u8", "<i8", "",
                             "not-a-dtype", 5, None])
    return [b"frame", _pack(h), _pixels((8, 8))]


def bad_field(rng: random.Random) -> Parts:
    h = _header(rng)
    field, value = rng.choice([
        ("source", "nl\n"), ("source", ""), ("source", "x" * 65), ("source", "a b"),
        ("source", 7), ("seq", -1), ("seq", 2**63), ("seq", 2**64 - 1), ("seq", 1.5),
        ("seq", "1"), ("t_acq_ns", 2**63), ("t_acq_ns", -5), ("pixel_size_nm", -1.0),
        ("pixel_size_nm", 0.0), ("pixel_size_nm", math.inf), ("pixel_size_nm", math.nan),
        ("pixel_size_nm", 1e9), ("modality", "XRAY"), ("stage", {"x_um": math.nan, "y_um": 0}),
        ("stage", {"x_um": 1e12, "y_um": 0}), ("stage", [1, 2]), ("magnification", -3.0),
        ("magnification", math.inf), ("meta", {"k": math.nan}), ("meta", {"k": [1]}),
        ("meta", {"": 1}), ("meta", {f"k{i}": i for i in range(65)}), ("meta", {"k": "x" * 1025}),
        ("meta", [1, 2]),
    ])
    h[field] = value
    return [b"frame", _pack(h), _pixels((8, 8))]


def missing_field(rng: random.Random) -> Parts:
    h = _header(rng)
    del h[rng.choice(["source", "seq", "t_acq_ns", "shape", "dtype"])]
    return [b"frame", _pack(h), _pixels((8, 8))]


def wrong_length(rng: random.Random) -> Parts:
    shape = (rng.randrange(1, 32), rng.randrange(1, 32))
    n = len(_pixels(shape))
    size = rng.choice([0, n - 1, n + 1, n * 2, 1]) if n > 1 else 3
    return [b"frame", _pack(_header(rng, shape)), bytes(size)]


def oversized(rng: random.Random) -> Parts:
    # the header alone announces more than the limit (2 MiB in the fuzz daemons)
    shape = (rng.randrange(1100, 4000), rng.randrange(1100, 4000))
    return [b"frame", _pack(_header(rng, shape, "<f4")), b"\x00" * 16]


def bad_pixels(rng: random.Random) -> Parts:
    arr = np.full((8, 8), 1.0, np.float64)
    arr[rng.randrange(8), rng.randrange(8)] = rng.choice([math.nan, math.inf, -math.inf, 1e308,
                                                          -1e308, 3e30])
    h = frame_header(arr, source="fzpx", seq=rng.randrange(1 << 20), t_acq_ns=time.time_ns(),
                     pixel_size_nm=0.5)
    return [bytes(p) for p in encode_frame(h, arr)]


def huge_header(rng: random.Random) -> Parts:
    h = _header(rng)
    h["meta"] = {"k": "x" * 1000}
    h["pad"] = "y" * (300 * 1024)  # beyond the 256 KiB header limit
    return [b"frame", _pack(h), _pixels((8, 8))]


GENERATORS: dict[str, Callable[[random.Random], Parts]] = {
    f.__name__: f for f in (garbage_parts, wrong_part_count, bad_topic, not_msgpack, not_a_map,
                            bad_version, bad_shape, bad_dtype, bad_field, missing_field,
                            wrong_length, oversized, bad_pixels, huge_header)
}


def malformed(n: int, seed: int = 0) -> list[tuple[str, Parts]]:
    """``n`` malformed messages (kind, parts), every generator in turn, reproducibly."""
    rng = random.Random(seed)
    names = list(GENERATORS)
    return [(names[i % len(names)], GENERATORS[names[i % len(names)]](rng)) for i in range(n)]


def valid_oddities(seq0: int = 0) -> list[tuple[np.ndarray, float | None]]:
    """Valid but unusual frames the daemon must answer: tiny, thin, flat, extreme values."""
    rng = np.random.default_rng(seq0)
    return [
        (np.zeros((1, 1), np.uint8), 0.5),
        (np.full((1, 257), 7, np.uint16), None),
        (np.full((300, 2), 9, np.int16), 1.0),
        (rng.normal(0, 1e29, (64, 64)), 0.3),
        (np.full((48, 48), -1e-30, np.float32), 2.0),
        (rng.integers(0, 2**32, (33, 65), dtype=np.uint64).astype(np.uint32), None),
        (rng.integers(-128, 127, (70, 40)).astype(np.int8), 5.0),
    ]


# ---------------------------------------------------------------------------------------------
# result messages (what a subscriber may be sent by a broken or hostile publisher)

_RESULT_TOPICS = (b"det.fz", b"stats.fz", b"class.fz", b"alert.fz", b"preview.fz", b"health")


def _det_header(rng: random.Random) -> dict:
    return {"v": [1, 3], "source": "fz", "seq": rng.randrange(100), "t_acq_ns": 1,
            "t_recv_ns": 2, "t_done_ns": 3, "stage_ms": {}, "pixel_size_nm": 0.5, "units": "nm",
            "n": 2, "engine": "x"}


def malformed_result(rng: random.Random) -> Parts:
    """One result message that no subscriber may accept."""
    kind = rng.randrange(6)
    topic = rng.choice(_RESULT_TOPICS)
    if kind == 0:
        return [topic] + [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(0, 4))]
    if kind == 1:
        return [topic, rng.choice([b"\xc1", msgpack.packb([1]), msgpack.packb({"v": [9, 0]})])]
    if kind == 2:  # a det whose table length disagrees with n
        h = _det_header(rng)
        return [b"det.fz", _pack(h), bytes(rng.choice([0, 7, 1000]))]
    if kind == 3:  # header fields of the wrong type or range
        h = _det_header(rng)
        h[rng.choice(["seq", "n", "units", "t_done_ns", "source"])] = rng.choice(
            [-1, "x", 2**64 - 1, None, [1], "nl\n"])
        return [b"det.fz", _pack(h), b""]
    if kind == 4:  # a preview / class / alert whose buffers disagree with the header
        return rng.choice([
            [b"preview.fz", _pack({"v": [1, 3], "source": "fz", "seq": 1, "shape": [4, 4],
                                   "size": [4, 4], "scale": 1.0}), b"\x00" * 3],
            [b"class.fz", _pack({"v": [1, 3], "source": "fz", "seq": 1, "labels": ["a"],
                                 "probabilities": [1.0], "heatmap_shape": [2, 2]}), b"\x00"],
            [b"alert.fz", _pack({"v": [1, 3], "source": "fz", "seq": 1, "rule": "r",
                                 "kind": "particle", "severity": "loud", "value": 1.0,
                                 "threshold": 0.0, "explanation": "", "n": 0}), b""],
        ])
    return [b"health", _pack({"v": [1, 3], "t_ns": "soon", "uptime_s": 1})]


def malformed_results(n: int, seed: int = 0) -> list[Parts]:
    """``n`` malformed result messages, reproducibly."""
    rng = random.Random(seed)
    return [malformed_result(rng) for _ in range(n)]
