"""``nanoscout dashboard``: a live web page of what the daemon publishes.

:mod:`nanoscout.clients.dashboard.gateway` subscribes to the daemon and keeps the newest of everything
(latest-wins); :mod:`nanoscout.clients.dashboard.server` serves the page (``static/``, plain JavaScript
drawing on canvas, no third-party code, works offline) and pushes changes to each browser with
server-sent events. :mod:`nanoscout.clients.dashboard.lens` asks the daemon's query socket for the AI
lens's feature maps when the page asks for them.
"""

from nanoscout.clients.dashboard.gateway import DashboardState, Gateway, Item
from nanoscout.clients.dashboard.lens import LensView
from nanoscout.clients.dashboard.server import DashboardServer, run_dashboard

__all__ = ["DashboardServer", "DashboardState", "Gateway", "Item", "LensView", "run_dashboard"]
