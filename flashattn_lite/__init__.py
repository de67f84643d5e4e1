"""flashattn_lite: FlashAttention-style exact attention for PyTorch."""

from .backends import available_backends, use_backend
from .interface import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from .kvcache import flash_attn_with_kvcache
from .quant import quantize_kv
from .modules import FlashAttention, FlashCrossAttention, FlashSelfAttention, swap_attention
from .sdpa_patch import disable_sdpa_patch, enable_sdpa_patch, patch_sdpa, sdpa_patch_enabled

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "scaled_dot_product_attention",
           "quantize_kv",
           "use_backend", "available_backends",
           "FlashAttention", "FlashSelfAttention", "FlashCrossAttention", "swap_attention",
           "patch_sdpa", "enable_sdpa_patch", "disable_sdpa_patch", "sdpa_patch_enabled",
           "__version__"]
