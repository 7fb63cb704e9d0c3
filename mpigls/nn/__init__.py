"""The networks: architectures with their flat parameter views (models), the batched forward of P weight
vectors (population), the classification margins and the PGD attack on them (attacks)."""
