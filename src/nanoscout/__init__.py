"""nanoscout: live analysis for electron microscopes.

Frames flow from an acquisition adapter over ZeroMQ to an inference daemon that finds and
measures nanoparticles and publishes detections, size statistics and alerts. The sub-packages
are the layers (each imports only those below it; ``lint-imports`` checks it, see
ARCHITECTURE.md)::

    cli        the ``nanoscout`` command (composition root)
    training   networks, training, evaluation, export (torch)
    batch      offline analysis of files with the daemon's pipeline
    clients    adapters, subscriber SDK, recorder, report, dashboard, stage search
    sim        synthetic specimens, the virtual microscope's specimen, field generators
    daemon     threads, composition, query socket, metrics, configuration
    analysis   one frame: preprocess, detect, measure, statistics, alerts, classify
    engines    ONNX Runtime / TensorRT behind one interface
    wire       protocol, transport, errors, particle table
"""

from nanoscout._version import __version__

__all__ = ["__version__"]
