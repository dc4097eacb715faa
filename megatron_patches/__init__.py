"""Megatron-Core pretraining pipeline: the training loop and the patches it plugs in."""
