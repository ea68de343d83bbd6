"""sipis.sip."""
