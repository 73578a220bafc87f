"""Acquisition adapters: they turn images (simulated, from files, from a watched folder) into
``frame`` messages for the daemon."""

from nanoscout.clients.acquisition.publisher import FramePublisher

__all__ = ["FramePublisher"]
