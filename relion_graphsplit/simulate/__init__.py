"""Simulated particle sets with known truth: particles (images, poses, CTF, noise, the ceiling
classifier), models (maps from atomic models; needs gemmi) and metrics against the truth."""
