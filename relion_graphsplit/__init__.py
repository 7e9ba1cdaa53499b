"""Graph-based initial 3D classification of refined cryo-EM particles."""

import os

# torch's OpenMP workers spin while they wait; on a node shared with other jobs that made runs tens
# of times slower (measured: 82 s instead of 1 s for one step). Passive waiting costs nothing here.
# It must be set before torch is first imported; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS's worker threads (numpy's and scipy's) spin for about 2^28 cycles after each call before
# they sleep. Each cone's eigendecomposition left one spinning on the second of two cores while the
# compiled loops needed it: the classification took 1.7-1.8 s instead of 2.0 s at 24000 particles.
# 2^4 cycles is the shortest wait OpenBLAS allows. Like the line above, it counts only when set
# before numpy is first imported.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# Clarabel, the SDP solver under cvxpy, runs a thread pool (rayon) with one thread per core it may
# use, and its solution changes in the last bits with the pool's size: one graph gave three different
# solutions with 1, 2 and 4 threads. One thread gives every machine the same max-cut; the SDPs here
# are small (at most 80 cones: larger graphs go to Burer-Monteiro) and took as long on one thread.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

__version__ = "0.1.0"
