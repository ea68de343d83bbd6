"""sipis.push."""
