"""Triton kernel sources of flashattn_lite (installed as ``flashattn_lite.triton_kernels``).

Importing this package imports Triton but never touches the CUDA driver.
"""
