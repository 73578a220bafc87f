"""The microscope behind a stage search: stage and camera interfaces, their control socket, and
a simulated microscope (a virtual specimen rendered by the synthetic generator)."""
