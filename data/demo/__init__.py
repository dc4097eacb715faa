"""The small shipped demo corpus and the deterministic generator it was made with."""
