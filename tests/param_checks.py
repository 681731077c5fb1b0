"""Shared test assertions: two parameter trees hold the same arrays, and give the same logits, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np

from grok.model import transformer, weights
from grok.model.quant import QuantizedWeight8bit


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


def assert_same_logits(config, a, b) -> None:
    """The model gives bit-identical (finite) logits with parameter trees `a` and `b` (checkpoint layout)."""
    apply = jax.jit(transformer.build(config).apply)
    tokens = jnp.array([[1, 17, 200, 3, 45, 9, 128, 77], [5, 6, 7, 8, 9, 10, 11, 12]], jnp.int32)
    before = apply(weights.stack_layers(a, config.num_layers), tokens).logits
    after = apply(weights.stack_layers(b, config.num_layers), tokens).logits
    assert np.isfinite(np.asarray(before)).all()
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
