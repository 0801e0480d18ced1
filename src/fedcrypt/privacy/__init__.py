"""Attacks used as evidence of what each party learns: gradient inversion, membership inference."""
