"""Joyfull UI Hub: accounts, plans and metered access to many AI tools through one API."""

__version__ = "0.1.0"
