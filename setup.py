"""flashattn_lite packaging.

``flashattn_lite`` is the only top-level import name: the Triton sources in
``triton_kernels/`` install as ``flashattn_lite.triton_kernels`` and the C++/CUDA
sources in ``csrc/`` ship as package data (``flashattn_lite.csrc``) for
just-in-time builds.

Opt-in ahead-of-time build of the C++ CPU extension, against the torch already
installed (hence --no-build-isolation):

    FLASHATTN_LITE_BUILD_EXT=1 pip install --no-build-isolation .
"""

import os

from setuptools import setup

cmdclass, ext_modules = {}, []
if os.environ.get("FLASHATTN_LITE_BUILD_EXT") == "1":
    import glob
    import sys

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "flashattn_lite"))
    import _build  # flags shared with the just-in-time build

    ext_modules.append(CppExtension("flashattn_lite._C", ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
                                    extra_compile_args=_build.cflags(), extra_link_args=_build.ldflags()))
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=True)
    with open(os.path.join("flashattn_lite", _build.STAMP), "w") as f:
        f.write(_build.cache_key())  # the JIT loader uses this prebuilt library only while the key matches

setup(
    name="flashattn_lite",
    version="0.1.0",
    description="FlashAttention-style exact attention for PyTorch: Triton and C++ kernels, O(N) memory",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["flashattn_lite", "flashattn_lite.backends", "flashattn_lite.integrations",
              "flashattn_lite.triton_kernels", "flashattn_lite.csrc"],
    package_dir={"flashattn_lite.triton_kernels": "triton_kernels", "flashattn_lite.csrc": "csrc"},
    package_data={"flashattn_lite.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*", "cuda/emu/*"],
                  "flashattn_lite": ["_C.key"]},
    install_requires=["torch>=2.11", "triton>=3.4", "ninja", "einops", "filelock"],
    extras_require={"bench": ["matplotlib"], "test": ["pytest", "hypothesis", "matplotlib", "transformers>=5"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["flashattn-lite=flashattn_lite.cli:main"]},
)
