"""Scaling: MPI ranks, time and memory against the number of pixels, reading, bitwise sums."""
