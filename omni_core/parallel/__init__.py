"""Parallel Config: a pool of worker processes (or Ray actors), one per rank, running a stack together."""
