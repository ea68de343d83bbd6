"""sipis.registrar."""
