"""HF <-> Megatron-Core weight conversion for any TP/PP layout (``python -m tools.convert``)."""
