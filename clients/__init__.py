"""Everything that talks to the daemon: acquisition adapters, the subscriber SDK, the
``nanoscout`` command line and the terminal viewer.

Clients speak to the daemon only through :mod:`service.protocol` and :mod:`service.transport`;
the command line (:mod:`clients.cli`) is the one composition root that also starts the daemon.
"""
