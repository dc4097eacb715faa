"""Command-line tools around training: weight conversion, evaluation, inference."""
