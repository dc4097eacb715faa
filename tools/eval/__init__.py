"""Offline evaluation of HF exports: per-channel PPL, probes, rewritten benchmarks, lenses."""
