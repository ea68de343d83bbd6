"""sipis.store."""
