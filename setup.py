"""The optional compiled kernels (mpiattn/core/_kernels.c); everything else is in
pyproject.toml. The library is plain C loaded with ctypes (mpiattn.core.kernels): no Python
headers needed. Where it cannot be built the install goes on and the NumPy passes run."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mpiattn.core._kernels",
    sources=["mpiattn/core/_kernels.c"],
    # IEEE operations in source order (no FMA contraction, no fast-math): the same bits
    # on every CPU clone; -fno-trapping-math only lets the selects vectorise
    extra_compile_args=["-O3", "-std=gnu99", "-ffp-contract=fast", "-fno-trapping-math"],
    optional=True,
)])
