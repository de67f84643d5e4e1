"""flashattn_lite: FlashAttention-style exact attention for PyTorch."""

from .backends import available_backends, use_backend
from .interface import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from .kvcache import flash_attn_with_kvcache

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "scaled_dot_product_attention", "use_backend", "available_backends",
           "__version__"]
