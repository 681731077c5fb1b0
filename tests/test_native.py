"""The native CPU kernel (grok.native): its products against a float64 NumPy reference, where
`ops.matmul_t` uses it, and the fallbacks when it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok import native, ops

needs_kernel = pytest.mark.skipif(native._unsupported_reason() is not None, reason=str(native._unsupported_reason()))


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("k, n", [(8, 1), (13, 2), (520, 3), (1030, 65), (64, 130)])
def test_kernel_matches_float64_reference(m, k, n):
    # k: under, not a multiple of, and past the kernel's 8-float steps and 512-float blocks;
    # n: odd (a lone last weight row) and past its 64-row units of work (several threads).
    assert native.available()
    x, w_t = _operands(m, k, n)
    y = np.asarray(jax.jit(native.matmul_t)(x, w_t))
    reference = x.astype(np.float64) @ w_t.astype(np.float64).T
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w_t).T.astype(np.float64))
    assert y.shape == (m, n) and y.dtype == np.float32
    assert np.all(np.abs(y - reference) <= bound), np.max(np.abs(y - reference) / bound)


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
    assert (native.TARGET in jaxpr) == used
    reference = x.astype(np.float64) @ w_t.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(jax.jit(ops.matmul_t)(x, w_t)), reference, rtol=1e-4, atol=1e-4)


def test_matmul_t_without_the_kernel_uses_xla(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    x, w_t = _operands(4, 64, 48)
    jaxpr = str(jax.make_jaxpr(ops.matmul_t)(x, w_t))
    assert native.TARGET not in jaxpr
    np.testing.assert_allclose(np.asarray(ops.matmul_t(jnp.asarray(x), jnp.asarray(w_t))), x @ w_t.T, rtol=1e-4, atol=1e-4)


def test_no_kernel_on_other_cpus(monkeypatch):
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native._load() == "the CPU is aarch64, not x86-64"


@needs_kernel
def test_a_failed_build_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GROK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    reason = native._load()
    assert isinstance(reason, str) and reason.startswith("building matmul_t.cc failed")
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left in the cache


@needs_kernel
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GROK_CACHE_DIR", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == stamp
