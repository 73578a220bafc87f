"""The installed distribution's version (from git tags at build time; see pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("nanoscout")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
