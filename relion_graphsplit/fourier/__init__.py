"""Engines of Fourier-space cryo-EM with no knowledge of the method: Euler geometry, point groups, the
CTF, projection, insertion and inversion (reconstruction), FSC; compiled loops shared by them."""
