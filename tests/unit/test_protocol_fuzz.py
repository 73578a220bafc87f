"""Property-based tests of the wire codec: whatever bytes arrive, decoding either gives a frame
the header fully describes or raises a ProtocolError naming a known reason, never anything else."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoscout.analysis.frame import Frame
from nanoscout.wire.errors import FrameError, ProtocolError, Reason
from nanoscout.wire.headers import FRAME_DTYPES, MAX_SIDE_PX, FrameHeader
from nanoscout.wire.protocol import decode_frame, decode_message, encode_frame, frame_header

SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = sorted({np.dtype(f"{end}{k}").str for k in FRAME_DTYPES for end in "<>"
                 if np.dtype(f"{end}{k}").itemsize > 1} | {"|u1", "|i1"})

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12,
)


def _valid_header() -> dict[str, Any]:
    h = frame_header(np.zeros((4, 6), np.uint16), source="fz", seq=3, t_acq_ns=10,
                     pixel_size_nm=0.5, meta={"a": 1})
    return h.model_dump(mode="json")


def _outcome(parts: list[bytes]) -> tuple[FrameHeader, np.ndarray] | None:
    """Decode; a ProtocolError is fine (its reason must be a known one), anything else fails."""
    try:
        header, array = decode_frame(parts, max_bytes=1 << 20)
    except ProtocolError as exc:
        assert isinstance(exc.reason, Reason) and str(exc)
        return None
    assert array.shape == header.shape and array.dtype == np.dtype(header.dtype)
    assert 1 <= header.shape[0] <= MAX_SIDE_PX and 1 <= header.shape[1] <= MAX_SIDE_PX
    assert array.nbytes == header.nbytes == math.prod(header.shape) * array.dtype.itemsize
    assert 0 <= header.seq < 2**63 and 0 <= header.t_acq_ns < 2**63
    assert "\n" not in header.source and len(header.source) <= 64
    return header, array


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_arbitrary_parts_never_raise_anything_but_protocol_errors(parts: list[bytes]) -> None:
    _outcome(parts)
    try:
        decode_message(parts)
    except ProtocolError as exc:
        assert isinstance(exc.reason, Reason)


@SETTINGS
@given(st.dictionaries(st.sampled_from(list(_valid_header())), json_like, max_size=6),
       st.binary(max_size=200))
def test_mutated_headers_either_describe_the_payload_or_are_refused(
        changes: dict[str, Any], payload: bytes) -> None:
    raw = {**_valid_header(), **changes}
    try:
        packed = msgpack.packb(raw, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):  # not representable in msgpack at all
        return
    _outcome([b"frame", packed, payload])


@SETTINGS
@given(st.tuples(st.integers(-(2**63), 2**64 - 1), st.integers(-(2**63), 2**64 - 1)),
       st.sampled_from(DTYPES))
def test_impossible_shapes_are_refused_without_overflow(shape: tuple[int, int], dtype: str) -> None:
    raw = {**_valid_header(), "shape": list(shape), "dtype": dtype}
    got = _outcome([b"frame", msgpack.packb(raw), b"\x00" * 48])
    if got is not None:  # only a shape whose bytes are exactly the 48 given can pass
        assert got[1].nbytes == 48


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from(DTYPES), st.integers(0, 2**63 - 1),
       st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=64).filter(
           lambda s: s[0] not in "_.:-"))
def test_valid_frames_round_trip_exactly(rows: int, cols: int, dtype: str, seq: int,
                                         source: str) -> None:
    rng = np.random.default_rng(seq % 1000)
    arr = rng.integers(0, 100, (rows, cols)).astype(dtype)
    h = frame_header(arr, source=source, seq=seq, t_acq_ns=seq, pixel_size_nm=None)
    got = _outcome([bytes(p) for p in encode_frame(h, arr)])
    assert got is not None
    np.testing.assert_array_equal(got[1], arr)
    assert got[0] == h


@SETTINGS
@given(st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_truncated_or_padded_payloads_are_refused(cut: int, extra: bytes) -> None:
    arr = np.arange(24, dtype=np.uint16).reshape(4, 6)
    topic, header, pixels = (bytes(p) for p in encode_frame(
        frame_header(arr, source="fz", seq=1, t_acq_ns=1, pixel_size_nm=None), arr))
    for payload in (pixels[: min(cut, len(pixels) - 1)], pixels + extra):
        assert _outcome([topic, header, payload]) is None


@pytest.mark.parametrize("source", ["nl\n", "a\nb", "", "-lead", "x" * 65, "sp ace", "é"])
def test_source_names_are_matched_in_full(source: str) -> None:
    raw = {**_valid_header(), "source": source}
    with pytest.raises(ProtocolError, match="source"):
        decode_frame([b"frame", msgpack.packb(raw), b"\x00" * 48])


@SETTINGS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1,
                max_size=16))
def test_pixels_are_checked_once_into_a_clear_frame_error(values: list[float]) -> None:
    arr = np.asarray(values, np.float64).reshape(1, -1)
    try:
        Frame.from_image(arr, pixel_size_nm=None)
    except FrameError as exc:
        assert exc.reason in (Reason.NONFINITE, Reason.PIXEL_RANGE)
        assert not np.isfinite(arr).all() or np.abs(arr).max() > 1e30
    else:
        assert np.isfinite(arr).all() and np.abs(arr).max() <= 1e30
