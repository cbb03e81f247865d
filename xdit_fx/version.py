"""The package version (one place; `xdit_fx.__version__` and the dumps read it)."""

__version__ = "0.1.0"
