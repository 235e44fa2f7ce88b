"""The optional compiled kernels (mpiattn/core/_kernels.c); everything else is in
pyproject.toml. The library is plain C loaded with ctypes (mpiattn.core.kernels): no Python
headers needed. Where it cannot be built the install goes on and the NumPy passes run."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mpiattn.core._kernels",
    sources=["mpiattn/core/_kernels.c"],
    # no -ffast-math (NaN and infinities propagate as in NumPy; the sums run in fixed
    # lanes); products may contract into FMA; -fno-trapping-math lets the selects vectorise
    extra_compile_args=["-O3", "-std=gnu99", "-ffp-contract=fast", "-fno-trapping-math"],
    optional=True,
)])
