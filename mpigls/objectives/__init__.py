"""What training minimises: the natural, adversarial (PGD) and certified losses, and the PGD attack."""
