"""Scaling-law sweeps: plan a grid of small runs, train it, fit L(N, D), predict the big run."""
