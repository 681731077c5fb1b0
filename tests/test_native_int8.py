"""The native int8 CPU kernels (grok/native/int8_matmul.cc) against XLA's product of the same
bf16-rounded values, on every code path this CPU has (`GROK_NATIVE_ISA` forces each), and the
int8 CPU format's whole model against the f32 format's and the NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import numpy_reference
import pytest

from grok import PRESETS, native
from grok.model import ops, transformer, weights
from grok.model.quant import BF16Table, Int8CpuWeight, QuantizedWeight8bit, dequantize_to_f32

needs_kernels = pytest.mark.skipif(not native.int8_available(), reason="the int8 kernels cannot be built here")


def _paths() -> list[str]:
    flags = native._cpu_flags()
    return [name for name, needs in native.ISA_CPU_FLAGS.items() if all(f in flags for f in needs)]


@pytest.fixture(params=list(native.ISAS))
def isa(request, monkeypatch):
    """Each code path in turn, forced through $GROK_NATIVE_ISA (skipped where the CPU lacks it)."""
    if request.param not in _paths():
        pytest.skip(f"this CPU lacks {request.param}")
    monkeypatch.setenv(native.ISA_VARIABLE, request.param)
    assert native.isa() == request.param
    return request.param


def fresh_jit(fn):
    """A jit with its own trace cache: the code path is read when tracing, so a cached trace of
    another path must not be reused."""
    return jax.jit(functools.partial(fn))


def _weight(rng, k, n, blocks, experts=None):
    lead = () if experts is None else (experts,)
    w = rng.integers(-127, 128, (*lead, k, n), dtype=np.int8)
    scales = (rng.uniform(0.5, 1.5, (*lead, blocks, n)) / (64 * np.sqrt(k))).astype(ml_dtypes.bfloat16)
    return QuantizedWeight8bit(jnp.asarray(w), jnp.asarray(scales))


def assert_close_to(y, reference, x, w_values):
    """y equals the f32 product within one bf16 ulp of each element, or within float32 summation
    reordering error (4 k eps |x| |w|) where cancellation makes an element's ulp smaller than that;
    and after rounding to bf16 nearly every element is identical."""
    y, reference = np.asarray(y, np.float64), np.asarray(reference, np.float64)
    assert y.shape == reference.shape
    if not y.size:
        return
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(reference), 1e-30))) - 7)
    reorder = 4 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(np.asarray(x, np.float64)) @ np.abs(w_values))
    assert np.all(np.abs(y - reference) <= np.maximum(ulp, reorder)), np.max(np.abs(y - reference) / np.maximum(ulp, reorder))
    rounded = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float32)
    assert np.mean(rounded(y) == rounded(reference)) >= 0.97


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 6, 7, 16, 40])
@pytest.mark.parametrize("k, n, blocks", [(64, 64, 1), (13, 5, 1), (70, 130, 2), (256, 321, 8), (1030, 96, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_int8_product_equals_xla_of_the_rounded_values(isa, m, k, n, blocks, dtype):
    # m: each path's row classes (slabs of 1-3 rows, of up to 6 in registers and up to 32 through a
    # panel with FMAs, column tiles beyond); k: under and not a multiple of the vector widths, odd
    # (a lone last row of a pair), past the 32-row panels; n: partial sub-tiles and more than one
    # 256-column unit; 1, 2 and 8 scale blocks.
    rng = np.random.default_rng(m * 1000 + k)
    w = _weight(rng, k, n, blocks)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    values = np.asarray(dequantize_to_f32(w), np.float64)
    reference = jnp.dot(x.astype(jnp.float32), dequantize_to_f32(w), precision=jax.lax.Precision.HIGHEST)
    y = fresh_jit(native.int8_matmul)(x, w.weight, w.scales)
    assert y.dtype == jnp.float32
    assert_close_to(y, reference, x.astype(jnp.float32), values)


@needs_kernels
@pytest.mark.parametrize("sizes, rows", [([3, 0, 5, 1], 12), ([0, 0, 0], 4), ([1, 7], 8), ([40, 0, 2], 42)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_grouped_int8_product_runs_each_group_with_its_own_expert(isa, sizes, rows, dtype):
    """Rows grouped by expert, some groups empty (their expert unread), rows past the groups zero."""
    rng = np.random.default_rng(rows)
    k, n = 70, 200
    w = _weight(rng, k, n, 2, experts=len(sizes))
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    y = np.asarray(fresh_jit(native.int8_matmul)(x, w.weight, w.scales, jnp.asarray(sizes, jnp.int32)))
    values = np.asarray(dequantize_to_f32(w), np.float64)
    first = 0
    for e, size in enumerate(sizes):
        part = x[first : first + size].astype(jnp.float32)
        reference = jnp.dot(part, values[e].astype(np.float32), precision=jax.lax.Precision.HIGHEST)
        assert_close_to(y[first : first + size], reference, part, values[e])
        first += size
    assert np.all(y[first:] == 0)


@needs_kernels
@pytest.mark.parametrize("m, k, n", [(1, 64, 100), (1, 300, 250), (4, 77, 33), (16, 1030, 250), (40, 96, 7)])
def test_bf16_table_product_equals_xla(isa, m, k, n):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    table = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    reference = jnp.dot(x.astype(jnp.float32), table.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    y = fresh_jit(native.bf16_matmul_t)(x, table)
    assert_close_to(y, reference, x.astype(jnp.float32), np.asarray(table, np.float64).T)


def test_a_path_the_cpu_lacks_or_an_unknown_one_is_refused(monkeypatch):
    monkeypatch.setenv(native.ISA_VARIABLE, "sse9")
    with pytest.raises(ValueError, match="GROK_NATIVE_ISA='sse9'"):
        native.isa()
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset({"sse2"}))
    monkeypatch.setenv(native.ISA_VARIABLE, "avx2")
    with pytest.raises(ValueError, match="lacks avx2, fma"):
        native.isa()
    monkeypatch.delenv(native.ISA_VARIABLE)
    assert native.isa() == "portable"  # the best this (pretend) CPU has


def test_between_the_avx512_paths_the_measured_bf16_dot_cost_decides(monkeypatch):
    monkeypatch.delenv(native.ISA_VARIABLE, raising=False)
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset(native.ISA_CPU_FLAGS["avx512"] + ("avx2", "fma")))
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "bf16_dot_cost", lambda: 1.0)  # a vdpbf16ps as cheap as an FMA
    assert native.isa() == "avx512"
    monkeypatch.setattr(native, "bf16_dot_cost", lambda: 4.0)  # as measured on a Xeon
    assert native.isa() == "avx512-fma"


@needs_kernels
@pytest.mark.skipif("avx512" not in _paths(), reason="the CPU lacks AVX-512 BF16")
def test_the_bf16_dot_cost_is_measured():
    assert 0.1 < native.bf16_dot_cost() < 100


@needs_kernels
def test_each_path_is_the_one_the_kernel_is_told():
    """The attribute reaching the kernel names the forced path (the products above then test it)."""
    for name in _paths():
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(native.ISA_VARIABLE, name)
            x, w = jnp.ones((2, 8), jnp.bfloat16), _weight(np.random.default_rng(0), 8, 4, 1)
            text = fresh_jit(native.int8_matmul).lower(x, w.weight, w.scales).as_text()
            assert f"isa = {native.ISAS[name]} : i32" in text, text


# ---------------------------------------------------------------------------------------------
# The whole model in the int8 CPU format
# ---------------------------------------------------------------------------------------------


def _prompts(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, size=(3, 12))
    tokens[1, 9:] = config.pad_token
    return jnp.asarray(tokens, jnp.int32)


@needs_kernels
@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_int8_cpu_format_logits_equal_the_f32_format_and_the_reference(preset):
    """Same bound as tests/test_model_vs_reference.py (2% of each row's largest logit), against the
    f32 CPU format and the NumPy reference; and the formats agree far more closely than that."""
    config = PRESETS[preset]
    per_layer = weights.random_params(config, seed=0)
    tokens = _prompts(config)
    apply = jax.jit(transformer.build(config, scan_layers=False).apply)
    int8_params = transformer.cpu_int8_params(per_layer)
    text = str(jax.make_jaxpr(apply)(int8_params, tokens))
    assert "grok_int8_matmul" in text and "grok_bf16_matmul_t" in text  # the native kernels run
    int8 = np.asarray(apply(int8_params, tokens).logits, np.float32)
    f32 = np.asarray(apply(transformer.f32_params(per_layer), tokens).logits, np.float32)
    reference, _ = numpy_reference.reference_forward(per_layer, config, np.asarray(tokens))
    real = np.asarray(tokens) > config.pad_token
    for other in (f32, reference):
        err = np.abs(int8 - other).max(-1) / np.abs(other).max(-1)
        assert err[real].max() < 0.02, err[real].max()
    assert np.mean(int8[real] == f32[real]) > 0.9  # mostly bit-identical: only summation order differs


def test_int8_cpu_format_holds_the_weights_as_loaded():
    config = PRESETS["tiny"]
    per_layer = weights.random_params(config, seed=0)
    params = transformer.cpu_int8_params(per_layer)
    for path, leaves in per_layer.items():
        for name, leaf in leaves.items():
            held = params[path][name]
            if isinstance(leaf, QuantizedWeight8bit):
                assert isinstance(held, Int8CpuWeight) and held.weight.dtype == jnp.int8
                np.testing.assert_array_equal(held.weight, leaf.weight)
            elif name == "embeddings":
                assert isinstance(held, BF16Table) and held.value.dtype == jnp.bfloat16
                np.testing.assert_array_equal(held.value, jnp.asarray(leaf, jnp.bfloat16))
    wide = sum(x.nbytes for x in jax.tree.leaves(params))
    released = sum(np.asarray(x).nbytes for x in jax.tree.leaves(per_layer))
    embedding = np.asarray(per_layer["language_model/in_out_embed"]["embeddings"]).nbytes
    assert wide == released - embedding // 2  # the bf16 table: half the f32 one, nothing else added


def test_without_the_kernels_the_int8_format_runs_on_xla(monkeypatch):
    """Where the kernels cannot be built, the same format runs on XLA with the same numbers."""
    config = PRESETS["tiny"]
    per_layer = weights.random_params(config, seed=1)
    tokens = _prompts(config, 1)
    params = transformer.cpu_int8_params(per_layer)
    apply = transformer.build(config, scan_layers=False).apply
    monkeypatch.setattr(ops, "int8_native", lambda: False)
    fallback = jax.jit(functools.partial(apply))
    assert "grok_int8" not in str(jax.make_jaxpr(fallback)(params, tokens))
    xla = np.asarray(fallback(params, tokens).logits, np.float32)
    f32 = np.asarray(jax.jit(apply)(transformer.f32_params(per_layer), tokens).logits, np.float32)
    real = np.asarray(tokens) > config.pad_token
    err = np.abs(xla - f32).max(-1) / np.abs(f32).max(-1)
    assert err[real].max() < 0.02
