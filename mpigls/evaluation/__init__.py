"""Evaluating a trained network: certification with every relaxation and PGD (certify), the complete
branch-and-bound verifier (verify) and loss landscapes (landscape)."""
