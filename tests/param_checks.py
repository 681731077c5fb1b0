"""Shared test assertion: two parameter trees hold the same arrays, bit for bit."""

import numpy as np

from grok import weights
from grok.quant import QuantizedWeight8bit


def assert_same_params(a, b) -> None:
    """Same names, leaf types, dtypes, shapes and bytes; `b` (what was read back) holds NumPy arrays."""
    names_a, leaves_a = weights.flatten(a)
    names_b, leaves_b = weights.flatten(b)
    assert names_a == names_b
    for name, x, y in zip(names_a, leaves_a, leaves_b):
        assert type(x) is type(y), name
        pairs = [(x.weight, y.weight), (x.scales, y.scales)] if isinstance(x, QuantizedWeight8bit) else [(x, y)]
        for u, v in pairs:
            u = np.asarray(u)
            assert isinstance(v, np.ndarray) and u.dtype == v.dtype and u.shape == v.shape, name
            assert u.tobytes() == v.tobytes(), name  # bit-exact
