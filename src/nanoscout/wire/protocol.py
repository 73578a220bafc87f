"""Wire protocol v1: the public API in one place (headers, codec, particle table).

The definitions live in :mod:`nanoscout.wire.headers` (typed headers, one per message kind,
each declaring its buffers), :mod:`nanoscout.wire.buffers` (the buffer table) and
:mod:`nanoscout.wire.codec` (pure encode / decode functions); this module gathers them for
users of the protocol (``from nanoscout.wire.protocol import DetHeader, decode_message``).
"""

from nanoscout.wire.buffers import Buffer
from nanoscout.wire.codec import (
    MAX_HEADER_BYTES,
    Message,
    check_version,
    decode_frame,
    decode_message,
    encode,
    encode_frame,
    encode_message,
    pack_header,
    unpack_header,
)
from nanoscout.wire.headers import (
    FRAME_DTYPES,
    HEADERS,
    MAX_SIDE_PX,
    MODALITIES,
    PARTICLE_SIZE_RANGE_NM,
    PARTICLE_SIZE_RANGE_PX,
    PIXEL_SIZE_RANGE_NM,
    PROTOCOL_VERSION,
    AckHeader,
    AlertHeader,
    ClassHeader,
    ControlReply,
    ControlRequest,
    DetHeader,
    Distribution,
    Drift,
    FieldStats,
    FrameDrift,
    FrameHeader,
    FrameRef,
    Header,
    HealthHeader,
    Histogram,
    InSitu,
    Kind,
    LensReply,
    LensRequest,
    LswFit,
    MetaValue,
    Modality,
    ParticleSizeNm,
    ParticleSizePx,
    PreviewHeader,
    SizeHint,
    Stage,
    StatsBlock,
    StatsHeader,
    TrackEvent,
    Tracking,
    UniqueStats,
    Units,
    check_particle_size_nm,
    check_particle_size_px,
    frame_header,
)
from nanoscout.wire.particles import PARTICLE_DTYPE

__all__ = [
    "FRAME_DTYPES", "HEADERS", "MAX_HEADER_BYTES", "MAX_SIDE_PX", "MODALITIES",
    "PARTICLE_DTYPE", "PARTICLE_SIZE_RANGE_NM", "PARTICLE_SIZE_RANGE_PX", "PIXEL_SIZE_RANGE_NM",
    "PROTOCOL_VERSION", "AckHeader", "AlertHeader", "Buffer", "ClassHeader", "ControlReply",
    "ControlRequest", "DetHeader", "Distribution", "Drift", "FieldStats", "FrameDrift",
    "FrameHeader", "FrameRef", "Header", "HealthHeader", "Histogram", "InSitu", "Kind",
    "LensReply", "LensRequest", "LswFit", "Message", "MetaValue", "Modality", "ParticleSizeNm",
    "ParticleSizePx", "PreviewHeader", "SizeHint", "Stage", "StatsBlock", "StatsHeader",
    "TrackEvent", "Tracking", "UniqueStats", "Units", "check_particle_size_nm",
    "check_particle_size_px", "check_version", "decode_frame", "decode_message", "encode",
    "encode_frame", "encode_message", "frame_header", "pack_header", "unpack_header",
]
