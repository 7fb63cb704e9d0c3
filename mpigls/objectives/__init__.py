"""What training minimises: the natural, adversarial (PGD, ``mpigls.nn.attacks``) and certified losses."""
