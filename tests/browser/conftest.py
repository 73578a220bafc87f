"""Browser tests reuse the system tests' real-daemon fixture."""

from tests.system.conftest import daemon_factory  # noqa: F401 (a pytest fixture)
