"""Block masks and index lists from a token geometry (pure functions, cached)."""
