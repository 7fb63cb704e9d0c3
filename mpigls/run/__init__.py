"""One training run: the generation loop (train), its preflight checks, the run directory, HDF5
checkpoints, live monitoring, the optimizer catalogue the loop runs, and host-memory settings."""
