"""Grok-2's release checkpoint (grok/checkpoint/grok2_release.py): a tiny Grok-2-shaped model
written in the release's own layout (Hugging Face names, [out, in] matrices, bf16, the experts'
hidden width split over 8 TP files, common tensors in two files) loads as released (bf16) and
quantized to int8 at load, on one device and on 8 under tensor_parallel and expert_tensor_parallel,
and gives the NumPy reference's logits."""

import jax
import ml_dtypes
import numpy as np
import numpy_reference
import pytest
from test_grok2_model import SHARD, TINY
from test_model_vs_reference import TOLERANCE, prompt_set, relative_error

from grok import Grok
from grok.checkpoint import grok2_release, safetensors_format
from grok.checkpoint.convert import convert
from grok.checkpoint.files import checkpoint_format
from grok.checkpoint.safetensors_format import write_file
from grok.model import weights
from grok.model.quant import QuantizedWeight8bit
from grok.parallel.sharding import Sharder, load_rules, mesh_of

RANKS = 8
NORMS = {"rms_norm": "pre_attn_norm", "rms_norm_1": "post_attn_norm", "rms_norm_2": "pre_moe_norm",
         "rms_norm_3": "post_moe_norm"}
LINEARS = {"multi_head_attention/query": "self_attn.q_proj", "multi_head_attention/key": "self_attn.k_proj",
           "multi_head_attention/value": "self_attn.v_proj", "multi_head_attention/linear": "self_attn.o_proj",
           "dense_mlp/linear": "mlp.gate_proj", "dense_mlp/linear_v": "mlp.up_proj",
           "dense_mlp/linear_1": "mlp.down_proj", "router": "block_sparse_moe.gate"}
EXPERTS = {"moe/linear": "w1", "moe/linear_v": "w3", "moe/linear_1": "w2"}
# The int8 model against the bf16 one: what the README states for quantizing at load.
INT8_BOUND = 0.08  # of each row's largest |logit| (measured: max 4.9%, median 0.7%)
INT8_TOP1 = 0.9  # of positions whose top token agrees


def bf16_params(config, seed):
    """A random Grok-2-shaped checkpoint tree in bf16: the 8-bit random weights' values, the rest rounded."""

    def value(leaf):
        if isinstance(leaf, QuantizedWeight8bit):
            return numpy_reference.dequantize(leaf).astype(ml_dtypes.bfloat16)
        return np.asarray(leaf, np.float32).astype(ml_dtypes.bfloat16)

    tree = weights.random_params(config, seed)
    return {path: {name: value(leaf) for name, leaf in leaves.items()} for path, leaves in tree.items()}


def write_release(directory, params, config):
    """The release's layout, written from the model tree by this test's own mapping."""
    directory.mkdir(parents=True)
    common, ranked = {}, [{} for _ in range(RANKS)]
    common["model.embed_tokens.weight"] = params["language_model/in_out_embed"]["embeddings"]
    common["lm_head.weight"] = params["language_model/in_out_embed"]["unembeddings"]
    common["model.norm.weight"] = params["language_model/rms_norm"]["scale"]
    for i in range(config.num_layers):
        layer, prefix = f"transformer/decoder_layer_{i}", f"model.layers.{i}"
        for module, name in NORMS.items():
            common[f"{prefix}.{name}.weight"] = params[f"{layer}/{module}"]["scale"]
        for module, name in LINEARS.items():
            common[f"{prefix}.{name}.weight"] = np.ascontiguousarray(params[f"{layer}/{module}"]["w"].T)
        for module, name in EXPERTS.items():
            stack = params[f"{layer}/{module}"]["w"]  # [E, in, out]
            for e, matrix in enumerate(stack):
                stored = matrix.T  # [out, in]: w1/w3 [F, D], w2 [D, F]
                axis = 1 if name == "w2" else 0
                for r, part in enumerate(np.split(stored, RANKS, axis=axis)):
                    ranked[r][f"{prefix}.block_sparse_moe.experts.{e}.{name}.weight"] = np.ascontiguousarray(part)
    keys = sorted(common)
    half = len(keys) // 2
    write_file(directory / "pytorch_model-00001-TP-common.safetensors", {k: common[k] for k in keys[:half]})
    write_file(directory / "pytorch_model-00002-TP-common.safetensors", {k: common[k] for k in keys[half:]})
    for r, tensors in enumerate(ranked):
        write_file(directory / f"pytorch_model-00003-TP-{r:03d}.safetensors", tensors)
    return directory


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    params = bf16_params(TINY, 7)
    return write_release(tmp_path_factory.mktemp("grok2") / "release", params, TINY), params


def reference(params, config, tokens):
    floats = {path: {name: np.asarray(leaf, np.float32) for name, leaf in leaves.items()}
              for path, leaves in params.items()}
    return numpy_reference.reference_forward(floats, config, tokens[None])[0][0]


def test_the_release_loads_as_bf16_and_matches_the_reference(tiny_release):
    directory, params = tiny_release
    assert checkpoint_format(directory) == "grok2-release"
    grok = Grok.from_checkpoint(directory, TINY, progress=False)
    assert grok.params["transformer/decoder_layer_0/moe/linear"]["w"].dtype == ml_dtypes.bfloat16  # as released
    tokens = prompt_set(TINY, 7)[0]
    err = relative_error(grok.logits(tokens), reference(params, TINY, tokens))
    assert err.max() < TOLERANCE, err.max()


def test_int8_at_load_stays_within_the_stated_bound_of_bf16(tiny_release):
    directory, params = tiny_release
    bf16 = Grok.from_checkpoint(directory, TINY, progress=False)
    int8 = Grok.from_checkpoint(directory, TINY, progress=False, quantize=True)
    assert int8.config == TINY
    rng = np.random.default_rng(0)
    errors, agree = [], []
    for _ in range(4):
        tokens = rng.integers(3, TINY.vocab_size, size=32)
        a, b = bf16.logits(tokens), int8.logits(tokens)
        errors.append(relative_error(b, a))
        agree.append(a.argmax(-1) == b.argmax(-1))
    errors, agree = np.concatenate(errors), np.concatenate(agree)
    print(f"int8 vs bf16: max {errors.max():.4f}, median {np.median(errors):.4f} of the row max; "
          f"top-1 agrees at {agree.mean():.1%}")
    assert errors.max() < INT8_BOUND and agree.mean() >= INT8_TOP1
    assert errors.max() > 0  # the weights did change


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("rules, mesh", [
    ("tensor_parallel", {"data": 1, "model": 8}),
    ("expert_tensor_parallel", {"data": 1, "expert": 2, "model": 4}),
])
def test_eight_devices_read_their_slices_and_match(tmp_path, rules, mesh, quantize):
    params = bf16_params(SHARD, 3)
    directory = write_release(tmp_path / "release", params, SHARD)
    sharder = Sharder(load_rules(rules), mesh_of(mesh, jax.devices()[:8]))
    grok = Grok.from_checkpoint(directory, SHARD, sharder=sharder, progress=False, quantize=quantize)
    tokens = prompt_set(SHARD, 3)[0]
    err = relative_error(grok.logits(tokens), reference(params, SHARD, tokens))
    assert err.max() < (INT8_BOUND if quantize else TOLERANCE), err.max()


def test_lazy_reads_equal_whole_reads(tiny_release):
    directory, params = tiny_release
    release = grok2_release.Release(directory)
    source = release.source("transformer/decoder_layer_1/moe/linear_1/w")  # [E, F, D] from [D, F/8] slices
    whole = np.asarray(source)
    np.testing.assert_array_equal(whole, params["transformer/decoder_layer_1/moe/linear_1"]["w"])
    np.testing.assert_array_equal(source[1:3, 5:30, 7:40], whole[1:3, 5:30, 7:40])
    quantized = grok2_release.quantized(source)
    values, scales = grok2_release.quantize_columns(whole)
    np.testing.assert_array_equal(quantized.weight[1:3, 5:30, 7:40], values[1:3, 5:30, 7:40])
    np.testing.assert_array_equal(np.asarray(quantized.scales), scales)
    error = np.abs(values * scales.astype(np.float32) - whole.astype(np.float32))
    assert (error <= scales.astype(np.float32) * 0.5 + 1e-6).all()  # round to nearest step


def test_convert_writes_the_int8_form_once(tiny_release, tmp_path, monkeypatch):
    """`convert --quantize int8`: the same int8 model as quantizing at load, written a slice at a time,
    kept when run again; without --quantize, Grok-2's release is refused (it loads as it is)."""
    directory, _ = tiny_release
    config = TINY.replace(release_dtype="bfloat16")  # the converted files hold its floats as released
    monkeypatch.setattr(safetensors_format, "WRITE_CHUNK", 4096)  # many slices per weight
    out = convert(directory, tmp_path / "int8", config, progress=False, quantize=True)
    assert checkpoint_format(out) == "safetensors"
    tokens = prompt_set(TINY, 7)[1]
    converted = Grok.from_checkpoint(out, config, progress=False)
    at_load = Grok.from_checkpoint(directory, config, progress=False, quantize=True)
    np.testing.assert_array_equal(converted.logits(tokens), at_load.logits(tokens))
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("tensor*.safetensors")}
    convert(directory, out, config, progress=False, quantize=True)  # again: every file kept
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("tensor*.safetensors")} == written
    with pytest.raises(ValueError, match="pass --quantize int8"):
        convert(directory, tmp_path / "bf16", config, progress=False)
