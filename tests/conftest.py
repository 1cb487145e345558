"""Fixtures for the tests only; the setup they share with the package's doctests (single-threaded
torch, fixed seeds) is in the repository's root conftest.py."""
