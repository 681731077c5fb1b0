"""Sharded execution on 8 virtual CPU devices: every shipped rules file on every mesh gives the
single-device logits, for full forward passes and cached decode steps; rule errors are named.

Tolerance: sharding changes matmul shapes and reduction order, so bf16 roundings land
differently and compound through the layers (about 0.2-0.4% of the row maximum on most
positions, a few percent where a token's router sits near a tie). A wrong layout (scales on the
wrong rows, heads mixed across devices) moves logits by tens of percent, which these bounds catch.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from grok import PRESETS, model, weights
from grok.loader import place_params
from grok.sharding import ShardingError, Sharder, load_rules, make_mesh, parse_mesh

CONFIG = PRESETS["shard"]
MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1)]
RULES = ["tensor_parallel", "expert_parallel", "replicated"]


@pytest.fixture(scope="module")
def host_params():
    return weights.stack_layers(weights.random_params(CONFIG, 0), CONFIG.num_layers)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(3, CONFIG.vocab_size, (8, 16)).astype(np.int32)


def sharded(rules: str, data: int, model_size: int, host_params) -> tuple[Sharder, dict]:
    sharder = Sharder(load_rules(rules), make_mesh(data, model_size, jax.devices()[: data * model_size]))
    return sharder, place_params(host_params, sharder.param_shardings(weights.model_shapes(CONFIG)))


def full_logits(sharder, params, tokens):
    apply = model.build(CONFIG, constrain=sharder.constrain).apply
    fn = jax.jit(lambda p, t: apply(p, t).logits, out_shardings=sharder.replicated())
    return np.asarray(fn(params, sharder.put(tokens, "tokens")), np.float32)


def cached_logits(sharder, params, tokens, prompt_len=12):
    """Prefill the first `prompt_len` tokens, then decode the rest one by one from the cache."""
    apply = jax.jit(model.build(CONFIG, constrain=sharder.constrain).apply)
    b, t = tokens.shape
    put = sharder.put
    memory = model.KVMemory(
        k=sharder.zeros_cache(model.cache_shape(CONFIG, b, 32)),
        v=sharder.zeros_cache(model.cache_shape(CONFIG, b, 32)),
        mask=put(np.zeros((b, 32), bool), "tokens"),
        step=jnp.zeros((b,), jnp.int32),
    )
    out = apply(params, put(tokens[:, :prompt_len], "tokens"), memory)
    logits = [np.asarray(out.logits, np.float32)]
    for i in range(prompt_len, t):
        out = apply(params, put(tokens[:, i : i + 1], "tokens"), out.memory)
        logits.append(np.asarray(out.logits, np.float32))
    return np.concatenate(logits, axis=1)


def assert_close(actual, expected):
    err = np.abs(actual - expected).max(-1) / np.abs(expected).max(-1)
    assert np.mean(err < 0.01) >= 0.95, f"only {np.mean(err < 0.01):.0%} of positions within 1%"
    assert err.max() < 0.06, f"a position is off by {err.max():.1%} of its row max"
    top2 = np.sort(expected, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] >= 0.02 * np.abs(top2[..., 1])
    np.testing.assert_array_equal(actual.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.fixture(scope="module")
def single_device(host_params, tokens):
    sharder, params = sharded("replicated", 1, 1, host_params)
    return full_logits(sharder, params, tokens), cached_logits(sharder, params, tokens)


@pytest.mark.parametrize("data,model_size", MESHES)
@pytest.mark.parametrize("rules", RULES)
def test_sharded_forward_matches_single_device(rules, data, model_size, host_params, tokens, single_device):
    sharder, params = sharded(rules, data, model_size, host_params)
    assert_close(full_logits(sharder, params, tokens), single_device[0])


@pytest.mark.parametrize("rules,data,model_size", [("tensor_parallel", 1, 8), ("expert_parallel", 2, 4)])
def test_sharded_cached_decode_matches_single_device(rules, data, model_size, host_params, tokens, single_device):
    sharder, params = sharded(rules, data, model_size, host_params)
    assert_close(cached_logits(sharder, params, tokens), single_device[1])


def test_weights_are_really_split(host_params):
    """On (1, 8) under tensor_parallel each device holds 1/8 of an expert matrix and of the 8 scale blocks."""
    _, params = sharded("tensor_parallel", 1, 8, host_params)
    w = params["transformer/decoder_layer/moe/linear_1"]["w"]
    assert w.weight.addressable_shards[0].data.shape == (2, 8, CONFIG.ffn_size // 8, 64)
    assert w.scales.addressable_shards[0].data.shape == (2, 8, 1, 64)


def test_block_scales_with_more_shards_than_blocks():
    """Four 8-block scales on 8 devices: the block axis cannot split, so scales are replicated and
    each device still applies the right block to its rows."""
    config = CONFIG.replace(num_layers=1)
    host = weights.random_params(config, 1)
    for path, leaves in host.items():  # only 4 blocks per 8-block weight
        w = leaves.get("w")
        if hasattr(w, "scales") and w.scales.shape[-2] == 8:
            leaves["w"] = type(w)(weight=w.weight, scales=w.scales[..., ::2, :])
    stacked = weights.stack_layers(host, 1)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), stacked)
    sharder = Sharder(load_rules("tensor_parallel"), make_mesh(1, 8))
    shardings = sharder.param_shardings(shapes)
    assert shardings["transformer/decoder_layer/multi_head_attention/linear"]["w"].scales.spec[-2] is None
    params = place_params(stacked, shardings)
    tokens = np.random.default_rng(1).integers(3, 256, (8, 8)).astype(np.int32)
    apply = model.build(config).apply
    expected = np.asarray(jax.jit(apply)(stacked, jnp.asarray(tokens)).logits, np.float32)
    fn = jax.jit(lambda p, t: model.build(config, constrain=sharder.constrain).apply(p, t).logits)
    assert_close(np.asarray(fn(params, sharder.put(tokens, "tokens")), np.float32), expected)


def write_rules(tmp_path, params: str, activations: str | None = None) -> str:
    if activations is None:
        activations = "\n".join(f"{name} = []" for name in ("tokens", "residual", "heads", "kv_cache", "logits"))
    path = tmp_path / "rules.toml"
    path.write_text(f"[params]\n{params}\n\n[activations]\n{activations}\n")
    return str(path)


ALL_PARAMS = '".*" = []'


@pytest.mark.parametrize(
    "params,activations,message",
    [
        ('"rms_norm" = ["-"]', None, "no rule matches parameter language_model/in_out_embed/embeddings"),
        ('".*" = []\n"nothing_like_this" = []', None, "rule 'nothing_like_this' matches no parameter"),
        ('"(unclosed" = []', None, "rule '(unclosed': regex does not compile"),
        ('".*" = ["-", "tensor"]', None, "unknown mesh axis 'tensor'"),
        ('"moe/linear/w$" = ["model", "-", "-"]\n".*" = []', None,
         "rule 'moe/linear/w$' for parameter transformer/decoder_layer/moe/linear/w: dimension of size 4 "
         "of shape (2, 4, 64, 88) cannot be split 8 ways"),
        ('"router/w$" = ["-"]\n".*" = []', None, "spec has 1 entries, the weight has 2 dimensions (shape (64, 4) per layer)"),
        (ALL_PARAMS, "tokens = []", "no spec for activation(s) heads, kv_cache, logits, residual"),
        (ALL_PARAMS, "tokens = []\nattention = []", "unknown activation 'attention'"),
    ],
)
def test_rule_errors_name_file_rule_and_parameter(tmp_path, params, activations, message):
    path = write_rules(tmp_path, params, activations)
    with pytest.raises(ShardingError, match=re.escape(message)) as err:
        Sharder(load_rules(path), make_mesh(1, 8)).param_shardings(weights.model_shapes(PRESETS["tiny"]))
    assert path in str(err.value)


def test_activation_errors_and_the_batch_of_one(host_params):
    sharder, _ = sharded("tensor_parallel", 8, 1, host_params)
    # A single sequence (prefill) keeps its batch axis whole; eight are split over `data`.
    assert sharder.put(np.zeros((1, 4), np.int32), "tokens").sharding.spec == PartitionSpec(None, None)
    assert sharder.put(np.zeros((8, 4), np.int32), "tokens").sharding.spec == PartitionSpec("data", None)
    sharder, _ = sharded("tensor_parallel", 1, 8, host_params)
    with pytest.raises(ShardingError, match=r"activation 'heads': dimension of size 4 .* cannot be split 8 ways"):
        sharder.activation("heads", (1, 3, 4, 8))
    with pytest.raises(ShardingError, match=re.escape("activation 'heads': dimension of size 4 of shape (1, 1, 4, 16)")):
        sharder.check_activations(PRESETS["tiny"])  # 4 query heads cannot split over model=8
    sharder.check_activations(CONFIG)


def test_unknown_rules_and_bad_meshes():
    with pytest.raises(ShardingError, match=r"unknown partition rules 'fsdp': shipped ones are \['expert_parallel'"):
        load_rules("fsdp")
    with pytest.raises(ShardingError, match="does not exist"):
        load_rules("/nonexistent/rules.toml")
    with pytest.raises(ShardingError, match="needs 6 devices, there are 8"):
        make_mesh(2, 3)
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    for bad in ("data=2", "model=x,data=1", "data=0,model=8", "pipeline=2,model=4"):
        with pytest.raises(ShardingError, match=re.escape(f"--mesh {bad!r}")):
            parse_mesh(bad)
    assert dict(make_mesh().shape) == {"data": 1, "model": 8}
