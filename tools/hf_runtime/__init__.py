"""HF model loading and generation, shared by tools/eval and tools/infer (neither imports the other)."""
