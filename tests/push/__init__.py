"""Tests of sipis.push."""
