"""flashattn_lite packaging.

``flashattn_lite`` is the only top-level import name: the Triton sources in
``triton_kernels/`` install as ``flashattn_lite.triton_kernels`` and the C++/CUDA
sources in ``csrc/`` ship as package data for just-in-time builds.
"""

from setuptools import setup

setup(
    name="flashattn_lite",
    version="0.1.0",
    description="FlashAttention-style exact attention for PyTorch: Triton and C++ kernels, O(N) memory",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["flashattn_lite", "flashattn_lite.backends", "flashattn_lite.integrations",
              "flashattn_lite.triton_kernels"],
    package_dir={"flashattn_lite.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "ninja", "einops"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["flashattn-lite=flashattn_lite.cli:main"]},
)
