"""Command-line tools around the training library: weight conversion, evaluation, inference."""
