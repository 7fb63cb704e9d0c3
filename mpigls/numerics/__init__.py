"""Reproducible numbers: counter-based perturbation noise (noise, philox) and the floating-point
settings that make certification and training deterministic (precision)."""
