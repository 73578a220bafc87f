"""Everything that talks to the daemon over ZeroMQ: acquisition adapters (simulator, file
replay, folder watch), the subscriber SDK, the terminal table, the recorder and its run files,
the report, the dashboard, the simulated microscope and the stage search. Clients reach the
daemon only through :mod:`nanoscout.wire`."""
