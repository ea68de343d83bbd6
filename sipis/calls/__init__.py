"""sipis.calls."""
