"""Display previews: the picture, the rate limit, and their wire format."""

from __future__ import annotations

import numpy as np
import pytest

from nanoscout.analysis.preprocess import normalize
from nanoscout.analysis.preview import PreviewLimiter, make_preview
from nanoscout.wire.errors import PayloadError, ProtocolError
from nanoscout.wire.protocol import PreviewHeader, decode_message, encode_message


def test_make_preview_shrinks_and_stretches() -> None:
    frame = np.tile(np.arange(2048, dtype=np.uint16), (1024, 1))
    img, scale = make_preview(normalize(frame), 512)
    assert img.dtype == np.uint8 and img.shape == (256, 512) and scale == 0.25
    assert img[:, :3].max() <= 2 and img[:, -3:].min() >= 253  # percentiles mapped to 0..255
    assert (np.diff(img[0].astype(int)) >= 0).all()
    small, s1 = make_preview(normalize(np.ones((40, 30), np.float32)), 512)
    assert small.shape == (40, 30) and s1 == 1.0 and (small == 0).all()  # flat frame: black


def test_limiter_allows_max_rate_per_source() -> None:
    lim = PreviewLimiter(2.0)
    assert lim.due("a", now=0.0) and lim.due("b", now=0.1)
    assert not lim.due("a", now=0.3) and lim.due("a", now=0.5) and not lim.due("a", now=0.9)
    assert lim.due("a", now=1.01)


def _header(size: tuple[int, int]) -> PreviewHeader:
    return PreviewHeader(source="cam", seq=3, t_acq_ns=1, shape=(100, 200), size=size,
                         scale=0.5, pixel_size_nm=0.4)


def test_preview_round_trip_and_rejections() -> None:
    img = np.arange(50 * 100, dtype=np.uint32).reshape(50, 100).astype(np.uint8)
    parts = encode_message(_header((50, 100)), img)
    msg = decode_message([bytes(p) for p in parts])
    assert msg.topic == "preview.cam" and msg.kind == "preview"
    np.testing.assert_array_equal(msg.array, img)
    assert msg.header.scale == 0.5  # type: ignore[attr-defined]
    with pytest.raises(PayloadError, match="uint8 image"):
        encode_message(_header((50, 100)), img.astype(np.uint16))
    with pytest.raises(PayloadError, match="uint8 image"):
        encode_message(_header((10, 10)), img)
    bad = [bytes(parts[0]), bytes(parts[1]), bytes(parts[2])[:-1]]
    with pytest.raises(ProtocolError, match="does not match size"):
        decode_message(bad)
    with pytest.raises(ProtocolError, match="parts"):
        decode_message([bytes(parts[0]), bytes(parts[1])])
