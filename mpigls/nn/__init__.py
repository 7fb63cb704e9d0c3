"""The networks: architectures with their flat parameter views (models), the batched forward of P weight
vectors (population) and the classification margins."""
