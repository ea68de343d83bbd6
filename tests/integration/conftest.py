"""Integration fixtures live in harness.py; the suite-wide secret check is in tests/conftest.py."""
