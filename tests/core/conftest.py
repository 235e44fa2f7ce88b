"""Fixtures of the core tests."""

import pytest

from mpiattn.core import kernels


@pytest.fixture(params=["compiled", "numpy"])
def path(request, monkeypatch):
    """Each dispatching operation once through the kernels and once through NumPy, with
    the kernels' calls counted."""
    calls = []
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "LIB", None)
    elif kernels.LIB is None:
        pytest.skip(kernels.description())
    else:
        for name in ("gelu", "attention", "add_layer_norm"):
            real = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, _f=real, _n=name, **k: (
                calls.append(_n), _f(*a, **k))[1])
    return request.param, calls
