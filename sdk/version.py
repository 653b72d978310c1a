"""The package version, a module of its own so that sdk modules read it without importing sdk/__init__."""

__version__ = "0.1.0"
