"""Methods for transformers only: they read the attention probabilities."""
