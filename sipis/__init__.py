"""sipis: keeps mobile softphones SIP-registered and wakes them with pushes."""

__version__ = "0.1.0"
