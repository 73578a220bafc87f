"""Offline analysis of image files with the daemon's own pipeline (``nanoscout measure``):
the same numbers as a live stream, written as tables and masks."""
