"""Simulated specimens with exact truth (numpy only, no torch): the synthetic particle
generator, the virtual 200 µm specimen of the simulated microscope, field-of-view scenes and
burnt-in overlays. Used by the simulator, tests, benchmarks and training; never by the daemon."""
