"""Doctests of ``src/nanoscout`` (``pytest`` collects them with ``--doctest-modules``).

The SDK's examples run against a real daemon: a lossless ``nanoscout serve`` and a simulator
streaming source ``sim``, started once per session for the doctests that name ``RESULTS``
(the daemon's result endpoint) or ``QUERY`` (its lens query socket).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

NEEDS_DAEMON = ("nanoscout.clients.subscriber", "nanoscout.clients.aio", "nanoscout.clients.query")


@pytest.fixture(scope="session")
def example_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A daemon with frames flowing: its result and query endpoints."""
    from tests.system.conftest import nanoscout, start_daemon, stop_process

    d = start_daemon(tmp_path_factory.mktemp("doctest-daemon"), "--policy", "lossless")
    sim = nanoscout("simulate", "--frames-endpoint", d.input, "--results", d.output,
                    "--size", "256", "--rate", "2", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        assert d.query is not None
        from nanoscout.clients.subscriber import Subscriber

        with Subscriber(d.output, topics=("det.sim",)) as sub:  # frames are flowing
            assert sub.recv(timeout=120) is not None, "no frame analysed for the doctests"
        yield {"RESULTS": d.output, "QUERY": d.query}
    finally:
        for p in (sim, d.proc):
            stop_process(p, 60)


@pytest.fixture(autouse=True)
def _doctest_endpoints(request: pytest.FixtureRequest) -> None:
    """Give the SDK's doctests the example daemon's endpoints."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
    if request.node.name in NEEDS_DAEMON:
        namespace = request.getfixturevalue("doctest_namespace")
        namespace.update(request.getfixturevalue("example_daemon"))


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """Training modules need torch; without it their doctests are not collected."""
    if "training" in collection_path.parts:
        try:
            import torch  # noqa: F401
        except ImportError:
            return True
    return None
