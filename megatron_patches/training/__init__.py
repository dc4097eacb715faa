"""The lean training loop on Megatron-Core; each module holds one concern."""
