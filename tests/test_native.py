"""The native CPU kernels (grok.native): their products against a float64 NumPy reference, where
`ops` uses them (matmul_t, attention logits, the CPU format's mixture of experts), and the
fallbacks when they cannot be built."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok import native
from grok.model import ops, transformer
from grok.model.quant import F32Experts
from grok.model.transformer import no_constraint
from grok.parallel.sharding import Sharder, load_rules, make_mesh

needs_kernel = pytest.mark.skipif(native._unsupported_reason() is not None, reason=str(native._unsupported_reason()))


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)


def assert_matches_reference(y, x, w_t):
    """y == x @ w_t.T (batched over leading dimensions) within float32 summation error: at most
    4 k eps |x| |w| per element, against float64."""
    x64, w64 = x.astype(np.float64), w_t.astype(np.float64)
    reference = x64 @ np.swapaxes(w64, -1, -2)
    bound = 4 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(x64) @ np.swapaxes(np.abs(w64), -1, -2))
    assert y.shape == reference.shape and y.dtype == np.float32
    assert np.all(np.abs(y - reference) <= bound), np.max(np.abs(y - reference) / bound)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("k, n", [(8, 1), (13, 2), (520, 3), (1030, 65), (64, 130)])
def test_kernel_matches_float64_reference(m, k, n):
    # k: under, not a multiple of, and past the kernel's 8-float steps and 512-float blocks;
    # n: odd (a lone last weight row) and past its 96-row units of work (several threads).
    assert native.available()
    x, w_t = _operands(m, k, n)
    assert_matches_reference(np.asarray(jax.jit(native.matmul_t)(x, w_t)), x, w_t)


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 16, 200), (4, 128, 33), (6, 13, 5)])
def test_batched_kernel_is_one_product_per_batch_element(m, k, n):
    """x [2, 3, m, k] and w_t [2, 3, n, k]: element (i, j) of x times element (i, j) of w_t."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal((2, 3, m, k), dtype=np.float32)
    w_t = rng.standard_normal((2, 3, n, k), dtype=np.float32)
    assert native.available()
    assert_matches_reference(np.asarray(jax.jit(native.matmul_t)(x, w_t)), x, w_t)


@needs_kernel
@pytest.mark.parametrize("sizes, rows", [([3, 0, 5, 1], 12), ([0, 0, 0], 4), ([1, 7], 8), ([20, 0, 2], 22)])
@pytest.mark.parametrize("k, n", [(13, 5), (200, 130)])
def test_grouped_kernel_runs_each_group_with_its_own_weight(sizes, rows, k, n):
    """Rows grouped by expert (group sizes, some empty; rows past the groups are zero) times each
    expert's weight; an empty group's weight (NaN here) is never read."""
    rng = np.random.default_rng(len(sizes) + rows)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    weights = [rng.standard_normal((n, k), dtype=np.float32) if size else np.full((n, k), np.nan, np.float32) for size in sizes]
    assert native.available()
    y = np.asarray(jax.jit(native.grouped_matmul_t)(x, jnp.asarray(sizes, jnp.int32), weights))
    assert y.shape == (rows, n)
    start = 0
    for size, w_t in zip(sizes, weights):
        assert_matches_reference(y[start : start + size], x[start : start + size], w_t)
        start += size
    assert np.all(y[start:] == 0)


@needs_kernel
def test_kernel_rows_do_not_mix():
    # Each output row depends on its own input row only: changing one row changes one output row.
    x, w_t = _operands(8, 200, 70)
    y = np.asarray(native.matmul_t(x, w_t))
    x2 = x.copy()
    x2[5] += 1.0
    y2 = np.asarray(native.matmul_t(x2, w_t))
    changed = np.any(y != y2, axis=1)
    assert changed.tolist() == [r == 5 for r in range(8)]


@needs_kernel
@pytest.mark.parametrize("m, used", [(1, False), (2, True), (native.MAX_ROWS, True), (native.MAX_ROWS + 1, False)])
def test_matmul_t_uses_the_kernel_for_a_few_rows(m, used):
    x, w_t = _operands(m, 64, 48)
    jaxpr = str(jax.make_jaxpr(ops.matmul_t)(x, w_t))
    assert ("grok_matmul_t" in jaxpr) == used
    reference = x.astype(np.float64) @ w_t.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(jax.jit(ops.matmul_t)(x, w_t)), reference, rtol=1e-4, atol=1e-4)


def test_matmul_t_without_the_kernel_uses_xla(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    x, w_t = _operands(4, 64, 48)
    jaxpr = str(jax.make_jaxpr(ops.matmul_t)(x, w_t))
    assert "grok_matmul_t" not in jaxpr
    np.testing.assert_allclose(np.asarray(ops.matmul_t(jnp.asarray(x), jnp.asarray(w_t))), x @ w_t.T, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("t, native_kernels, used", [(1, True, True), (4, True, True), (5, True, False), (1, False, False)])
def test_attention_logits_use_the_kernel_for_decode_steps(t, native_kernels, used):
    """A few query rows per kv head (t tokens x 4 query heads per kv head <= MAX_ROWS) over a
    float32 cache take the kernel, unless the caller says the computation is sharded; the same
    numbers as XLA's batched dot up to f32 summation order."""
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.standard_normal((3, t, 8, 16)) * 3, jnp.bfloat16)
    k, v = (jnp.asarray(jnp.asarray(rng.standard_normal((3, 2, 20, 16)), jnp.bfloat16), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.uniform(size=(3, t, 20)) < 0.8)
    attend = functools.partial(ops.attention, multiplier=0.25, native_kernels=native_kernels)
    assert ("grok_matmul_t" in str(jax.make_jaxpr(attend)(q, k, v, mask))) == used
    got = np.asarray(jax.jit(attend)(q, k, v, mask), np.float32)
    xla = np.asarray(jax.jit(functools.partial(attend, native_kernels=False))(q, k, v, mask), np.float32)
    np.testing.assert_allclose(got, xla, rtol=2**-7, atol=1e-6)
    assert np.mean(got == xla) > 0.95


def test_only_unsharded_models_use_the_kernels():
    """The model passes `native_kernels=False` to attention when its activations are sharded over
    several devices: XLA cannot split a custom call, it would gather the whole cache."""
    rules = load_rules("tensor_parallel")
    assert not transformer.sharded(no_constraint)
    assert not transformer.sharded(Sharder(rules, make_mesh(1, 1, jax.devices()[:1])).constrain)
    assert transformer.sharded(Sharder(rules, make_mesh(2, 4)).constrain)


@needs_kernel
@pytest.mark.parametrize("n, used", [(1, True), (ops.NATIVE_MOE_TOKENS, True), (ops.NATIVE_MOE_TOKENS + 1, False)])
def test_cpu_format_mixture_uses_the_grouped_kernel_for_decode_batches(n, used):
    """Up to NATIVE_MOE_TOKENS tokens, either fast strategy over `F32Experts` runs `moe_grouped`
    (one native call per weight); its numbers are the XLA paths' (test_moe compares all of them
    with the reference)."""
    rng = np.random.default_rng(n)
    e, d, f = 4, 16, 24
    weights = [
        F32Experts(tuple(jnp.asarray(jnp.asarray(rng.standard_normal(shape) * 0.3, jnp.bfloat16), jnp.float32) for _ in range(e)))
        for shape in ((f, d), (f, d), (d, f))
    ]
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    gates, experts = ops.route(x, jnp.asarray(rng.standard_normal((d, e)), jnp.float32), 2)
    for impl in ("ragged", "gather"):
        jaxpr = str(jax.make_jaxpr(functools.partial(ops.moe, impl=impl))(x, gates, experts, *weights))
        assert ("grok_grouped_matmul_t" in jaxpr) == used
    grouped = np.asarray(jax.jit(ops.moe_grouped)(x, gates, experts, *weights), np.float32)
    ragged = np.asarray(jax.jit(ops.moe_ragged)(x, gates, experts, *weights), np.float32)
    np.testing.assert_allclose(grouped, ragged, rtol=2**-7, atol=1e-6)
    assert np.mean(grouped == ragged) > 0.95


def test_no_kernel_on_other_cpus(monkeypatch):
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native._unsupported_reason() == "the CPU is aarch64, not x86-64"
    assert native.isa() == "portable"  # the int8 kernels' portable path still builds there


@needs_kernel
def test_a_failed_build_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GROK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    reason = native._load(native.HERE / "matmul_t.cc", native.FLAGS)
    assert isinstance(reason, str) and reason.startswith("building matmul_t.cc failed")
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left in the cache


@needs_kernel
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("GROK_CACHE_DIR", str(tmp_path))
    with caplog.at_level("INFO", logger="grok"):
        first = native._build(native.HERE / "matmul_t.cc", native.FLAGS)
    assert first.parent == tmp_path / "native" and first.exists()
    assert "compiling the native CPU kernels" in caplog.text  # the few seconds it takes are announced
    caplog.clear()
    stamp = first.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="grok"):
        assert native._build(native.HERE / "matmul_t.cc", native.FLAGS) == first and first.stat().st_mtime_ns == stamp
    assert not caplog.text
