"""Batch inference over JSONL with N model replicas, and streaming generation for one prompt."""
