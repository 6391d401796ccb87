"""Solve: weight similarity, the four matchers and the MuDSC sweep loop — architecture-free."""
