"""A third-party client written from the published docs alone, against a real daemon.

The client half of this file (:class:`DocsClient` and the decoding helpers) uses only pyzmq,
msgpack and numpy, never an import of nanoscout: it is what a facility's programmer writes from
README.md, deploy/README.md and the module docstrings of ``src/nanoscout/wire`` (the wire
protocol's published docs). The particle table's numpy type and the topic of each message kind
are read from those docstrings here, so that the docs and the daemon are checked against each
other: a field, a type or a topic the docs get wrong fails this test.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from tests.system.conftest import DaemonFactory

pytestmark = pytest.mark.system

tifffile = pytest.importorskip("tifffile", reason="tifffile reads the real SEM image")

#: the Zeiss SEM image of particles (../shared/data/README.md: 384 x 512 uint8, 11.649976 nm/px)
IMAGE = Path("instrument-files") / "tiff" / "test_tiff_Zeiss_SEM_512pix.tif"
PIXEL_SIZE_NM = 11.649976
SOURCE = "docs-client"
SESSION = "docs-1"
N_FRAMES = 5
#: the alert rule's threshold, nm (the README's [[alerts]] example, at this image's sizes)
ALERT_ECD_NM = 200.0
#: a source name as the docs give it (codec docstring): 1-64 of A-Z a-z 0-9 _ . : -
_SOURCE_RE = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"


# ---------------------------------------------------------------------------------------------
# the published docs, read as text (module docstrings of src/nanoscout/wire)


def wire_doc(module: str) -> str:
    """The module docstring of ``nanoscout.wire.<module>``, read from its file (not imported)."""
    spec = importlib.util.find_spec(f"nanoscout.wire.{module}")
    assert spec is not None and spec.origin is not None
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    assert doc, f"nanoscout.wire.{module} has no module docstring"
    return doc


def documented_particle_dtype() -> np.dtype:
    """The particle table's numpy type as the particles.py docstring lists it (fields in order,
    each with its type)."""
    doc = wire_doc("particles")
    fields: list[tuple[Any, ...]] = []
    for line in doc.split("Fields", 1)[1].splitlines():
        m = re.match(r"(\w+(?:, \w+)*)\s+(<u4|<i4|<f4|u1|\?)( x \d+| \(u1\))?\s", line)
        if m is None:
            continue
        names, kind, extra = m.group(1).split(", "), m.group(2), m.group(3) or ""
        count = re.fullmatch(r" x (\d+)", extra)
        for name in names:
            fields.append((name, kind, (int(count.group(1)),)) if count else (name, kind))
    assert fields, "particles.py documents no field with its type"
    return np.dtype(fields)


def documented_topics() -> dict[str, re.Pattern[str]]:
    """Each message kind's topic, as the codec docstring's table gives it, as a pattern whose
    ``source`` group is the source it names (``det.<source>``, ``lens_request[.<source>]``)."""
    topics: dict[str, re.Pattern[str]] = {}
    for m in re.finditer(r"^``([^`]+)``\s+:class:`\w+`", wire_doc("codec"), re.MULTILINE):
        text = m.group(1)
        pattern = re.escape(text)
        pattern = re.sub(r"\\\[\\\.<(?:source|src)>\\\]", rf"(?:\\.(?P<source>{_SOURCE_RE}))?",
                         pattern)
        pattern = re.sub(r"(?<!\?P)<(?:source|src)>", rf"(?P<source>{_SOURCE_RE})", pattern)
        topics[re.split(r"[.\[]", text, maxsplit=1)[0]] = re.compile(pattern)
    assert topics, "codec.py documents no topic"
    return topics


# ---------------------------------------------------------------------------------------------
# the client: pyzmq + msgpack + numpy only


@dataclass
class Received:
    """What the subscriber decoded, by kind (the topic's first word)."""

    by_kind: dict[str, list[tuple[str, dict[str, Any], list[bytes]]]] = field(
        default_factory=lambda: defaultdict(list))

    def headers(self, kind: str) -> list[dict[str, Any]]:
        """The headers of every message of ``kind``, in arrival order."""
        return [h for _, h, _ in self.by_kind[kind]]


def frame_message(image: np.ndarray, seq: int, *, pixel_size_nm: float | None) -> list[bytes]:
    """``[b"frame", msgpack header, pixels]`` with the header keys the codec docstring lists."""
    header = {
        "v": [1, 12], "source": SOURCE, "seq": seq, "t_acq_ns": time.time_ns(),
        "shape": [int(image.shape[0]), int(image.shape[1])], "dtype": image.dtype.str,
        "pixel_size_nm": pixel_size_nm, "modality": "SEM", "session": SESSION,
        "stage": {"x_um": 12.5, "y_um": -3.0}, "meta": {"file": IMAGE.name, "frame": seq},
    }
    return [b"frame", msgpack.packb(header), np.ascontiguousarray(image).tobytes()]


def decode(parts: list[bytes]) -> tuple[str, dict[str, Any], list[bytes]]:
    """``[topic, msgpack header, *buffers]`` as (topic, header map, buffers)."""
    return parts[0].decode(), msgpack.unpackb(parts[1]), parts[2:]


@dataclass
class DocsClient:
    """Adapter (PUSH to a lossless daemon), subscriber (SUB to every topic) and query (REQ)."""

    input: str
    output: str
    query: str
    ctx: zmq.Context = field(default_factory=zmq.Context)

    def __post_init__(self) -> None:
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.output)

    def close(self) -> None:
        """Close every socket (linger 0) and the context."""
        self.ctx.destroy(linger=0)

    def messages(self, timeout_s: float) -> Iterator[tuple[str, dict[str, Any], list[bytes]]]:
        """Decoded results until ``timeout_s`` passes without one (then TimeoutError)."""
        while True:
            if not self.sub.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"no result for {timeout_s} s")
            yield decode(self.sub.recv_multipart())

    def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The first ``health`` heartbeat: the subscription has reached the daemon."""
        for topic, header, _ in self.messages(timeout_s):
            if topic == "health":
                return header
        raise AssertionError("unreachable")

    def send(self, frames: list[list[bytes]]) -> None:
        """PUSH each frame message to the daemon's input."""
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 10_000)
        push.connect(self.input)
        for parts in frames:
            push.send_multipart(parts)
        push.close()

    def collect(self, n_stats: int, n_acks: int, timeout_s: float = 120.0) -> Received:
        """Every result until ``n_stats`` ``stats`` (each frame's last message) and ``n_acks``
        acks of this client's source have come."""
        got = Received()
        for topic, header, buffers in self.messages(timeout_s):
            got.by_kind[topic.split(".", 1)[0]].append((topic, header, buffers))
            if (len(got.by_kind["stats"]) >= n_stats and len(got.by_kind["ack"]) >= n_acks):
                return got
        raise AssertionError("unreachable")

    def ask(self, topic: bytes, header: dict[str, Any], timeout_s: float = 30.0
            ) -> tuple[str, dict[str, Any], list[bytes]]:
        """One request on the query socket and its reply (a fresh REQ socket per request)."""
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.query)
        try:
            req.send_multipart([topic, msgpack.packb(header)])
            if not req.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"no reply to {topic!r} within {timeout_s} s")
            return decode(req.recv_multipart())
        finally:
            req.close()


# ---------------------------------------------------------------------------------------------
# the test


def test_a_client_written_from_the_docs_sends_subscribes_and_queries(
        daemon_factory: DaemonFactory, shared_data: Path) -> None:
    particle_dtype = documented_particle_dtype()
    topics = documented_topics()
    assert particle_dtype.itemsize == 83  # "83 bytes a row" (particles.py, README)
    image = tifffile.imread(shared_data / IMAGE)
    assert image.shape == (384, 512) and image.dtype == np.uint8

    d = daemon_factory("--policy", "lossless", config=(
        "[[alerts]]\nname = \"large-particle\"\nkind = \"particle\"\nseverity = \"warning\"\n"
        f"where = {{ ecd_nm = {{ gt = {ALERT_ECD_NM} }} }}\n"))
    assert d.query is not None
    client = DocsClient(d.input, d.output, d.query)
    try:
        client.wait_ready()
        # the last frame is the same image as big-endian uint16 (the docs: either byte order)
        wide = (image.astype(np.uint16) * 257).astype(">u2")
        frames = [frame_message(image, seq, pixel_size_nm=PIXEL_SIZE_NM)
                  for seq in range(N_FRAMES - 1)]
        frames.append(frame_message(wide, N_FRAMES - 1, pixel_size_nm=PIXEL_SIZE_NM))
        client.send(frames)
        got = client.collect(n_stats=N_FRAMES, n_acks=N_FRAMES)

        # every topic is the one the codec docstring documents for its kind, naming the source
        for kind, msgs in got.by_kind.items():
            for topic, header, _ in msgs:
                m = topics[kind].fullmatch(topic)
                assert m is not None, f"{kind} topic {topic!r} is not {topics[kind].pattern}"
                if "source" in header:
                    assert m.group("source") == header["source"], topic

        dets = {h["seq"]: (h, bufs) for _, h, bufs in got.by_kind["det"]}
        assert sorted(dets) == list(range(N_FRAMES))
        tables = {}
        for seq, (h, bufs) in dets.items():
            assert h["units"] == "nm" and h["pixel_size_nm"] == PIXEL_SIZE_NM
            assert h["shape"] == [384, 512] and h["meta"] == {"file": IMAGE.name, "frame": seq}
            assert h["stage"] == {"x_um": 12.5, "y_um": -3.0} and h["modality"] == "SEM"
            assert h["t_acq_ns"] <= h["t_recv_ns"] <= h["t_done_ns"]
            assert len(bufs) == 1
            table = np.frombuffer(bufs[0], dtype=particle_dtype)
            assert len(table) == h["n"] >= 5
            tables[seq] = table
        table = tables[0]
        print("particles of frame 0 (nm):")
        for row in table[:5]:
            print(f"  #{row['id']} at ({row['x']:.1f}, {row['y']:.1f}) px: ECD {row['ecd_nm']:.1f} nm, "
                  f"Feret {row['feret_min_nm']:.1f}-{row['feret_max_nm']:.1f} nm")
        # the documented fields hold what their docs say
        assert list(table["id"]) == list(range(1, len(table) + 1))
        x0, y0, x1, y1 = table["bbox"].T
        assert np.all((x0 <= table["x"]) & (table["x"] < x1) & (y0 <= table["y"]) & (table["y"] < y1))
        assert np.all((x0 >= 0) & (y0 >= 0) & (x1 <= 512) & (y1 <= 384))
        np.testing.assert_allclose(table["ecd_nm"], 2 * np.sqrt(table["area_nm2"] / math.pi), rtol=1e-4)
        # nm, not px: a particle's area is at least a pixel's and at most its box's, in nm²
        box_nm2 = (x1 - x0) * (y1 - y0) * PIXEL_SIZE_NM**2
        assert np.all((table["area_nm2"] >= PIXEL_SIZE_NM**2) & (table["area_nm2"] <= box_nm2 * 1.01))
        assert np.all((table["score"] >= 0) & (table["score"] <= 1))
        assert np.all((table["shape_class"] <= 6) & (table["aspect_ratio"] >= 1))
        assert np.all(table["feret_min_nm"] <= table["feret_max_nm"])
        assert np.all(table["track_id"] >= 1)  # tracking is on for serve
        # the big-endian frame is the same image: the same particles
        np.testing.assert_allclose(np.sort(tables[N_FRAMES - 1]["ecd_nm"]), np.sort(table["ecd_nm"]),
                                   rtol=1e-2)  # float rounding of the wider pixels

        stats = got.headers("stats")
        assert [h["seq"] for h in stats] == list(range(N_FRAMES))
        assert stats[-1]["units"] == "nm" and stats[-1]["cumulative"]["n_frames"] == N_FRAMES
        d50 = stats[0]["window"]["ecd"]["d50"]
        sized = table[~table["border"]]["ecd_nm"]
        assert d50 is not None and sized.min() <= d50 <= sized.max()

        for _, h, bufs in got.by_kind["class"]:
            assert len(h["labels"]) == len(h["probabilities"]) >= 1
            assert len(bufs) == (0 if h["heatmap_shape"] is None else 1)
            if bufs:
                assert len(bufs[0]) == math.prod(h["heatmap_shape"])  # uint8
        assert len(got.by_kind["class"]) == N_FRAMES

        alerts = got.by_kind["alert"]
        assert alerts, f"no particle above {ALERT_ECD_NM} nm alerted"
        for _, h, bufs in alerts:
            assert h["rule"] == "large-particle" and h["units"] == "nm" and h["seq"] in dets
            rows = np.frombuffer(bufs[0], dtype=particle_dtype)
            assert len(rows) == h["n"] and np.all(rows["ecd_nm"] > ALERT_ECD_NM)
            assert len(bufs) == (1 if h["heatmap_shape"] is None else 2)

        acks = got.headers("ack")
        assert [(a["session"], a["seq"], a["status"]) for a in acks] == [
            (SESSION, seq, "answered") for seq in range(N_FRAMES)]
        # the heartbeat counts a frame just after its ack: wait for the one that has them all
        for topic, health, _ in client.messages(30):
            if topic == "health" and health["frames_processed"] >= N_FRAMES:
                break
        assert health["policy"] == "lossless" and health["frames_received"] == N_FRAMES
        assert sum(health["rejected"].values()) == 0 and health["transport_gaps"] == 0

        # the query socket: lens maps of the newest frame, a control request, and refusals
        v = [1, 12]
        topic, lens, bufs = client.ask(b"lens_request",
                                       {"v": v, "source": SOURCE, "outputs": ["act_code"]})
        assert topics["lens"].fullmatch(topic) and lens["source"] == SOURCE, topic
        assert lens["error"] is None and lens["seq"] == N_FRAMES - 1 and lens["outputs"] == ["act_code"]
        maps = np.frombuffer(bufs[0], dtype="<f2").reshape(lens["shapes"][0])
        assert len(bufs) == 1 and np.isfinite(maps).all() and math.isfinite(lens["novelty"])
        topic, ctl, _ = client.ask(b"control_request",
                                   {"v": v, "action": "reset_statistics", "source": SOURCE})
        assert topics["control"].fullmatch(topic) and ctl["ok"] is True and ctl["error"] is None
        topic, ctl, _ = client.ask(b"control_request", {"v": v, "action": "reset_statistics"})
        assert topic.startswith("control") and ctl["ok"] is False
        assert ctl["error"].startswith("bad request: ") and "needs a source" in ctl["error"]
        topic, lens, _ = client.ask(b"lens_request", {"v": [2, 0], "source": SOURCE})
        assert topic.startswith("lens") and "major version 2" in lens["error"]
        topic, lens, _ = client.ask(b"lens_request",
                                    {"v": v, "source": "nobody", "outputs": ["act_code"]})
        assert topic == "lens.nobody" and "'nobody'" in lens["error"] and lens["shapes"] == []
    finally:
        client.close()
