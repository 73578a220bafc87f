"""Shared test fixtures: paths to the real data beside the repository."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real microscope data made by others); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real microscope data not found at {SHARED_DATA} (see README, 'Test data')")
    return SHARED_DATA


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout`` s pass.

    For servers that offer no readiness notification (an HTTP endpoint); raises TimeoutError.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)  # allowed: polling an HTTP server that cannot notify us
