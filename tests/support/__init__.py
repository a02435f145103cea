"""Shared test helpers (tiny models, image builders)."""
