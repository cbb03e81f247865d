"""CPU stand-in of xformers (see tests/standins/__init__.py)."""

XDIT_FX_STANDIN = True
__version__ = "0.0.28"
