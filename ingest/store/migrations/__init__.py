"""Versioned SQL migrations, applied in name order at start."""
