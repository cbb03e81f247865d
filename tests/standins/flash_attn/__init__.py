"""CPU stand-in of flash-attn 2.6 (see tests/standins/__init__.py)."""

XDIT_FX_STANDIN = True
__version__ = "2.6.3"

from flash_attn.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func,  # noqa: E402
                                             flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                             flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"]
