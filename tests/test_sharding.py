"""Sharded execution on 16 virtual CPU devices: every shipped rules file on meshes of two and three
axes gives the single-device logits, for full forward passes and cached decode steps, as do models
with fewer kv heads than model shards; rule and mesh errors are named.

Tolerance: sharding changes matmul shapes and reduction order, so bf16 roundings land
differently and compound through the layers (about 0.2-0.4% of the row maximum on most
positions, a few percent where a token's router sits near a tie). A wrong layout (scales on the
wrong rows, heads mixed across devices) moves logits by tens of percent, which these bounds catch.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from grok import PRESETS
from grok.checkpoint.loader import place_params
from grok.model import transformer, weights
from grok.parallel.sharding import (
    RULES_DIR,
    Sharder,
    ShardingError,
    load_rules,
    make_mesh,
    mesh_of,
    parse_mesh,
)

# Heads, experts and widths all divide by 16; its 8 kv heads are repeated on 16 model shards.
CONFIG = PRESETS["shard"].replace(num_q_heads=16, widening_factor=3.0)
# Per rules file, meshes of all 16 devices (axis sizes in the file's mesh order). Each case compiles
# three programs (about 10 s on two CPU cores), so only meshes that take different paths are here:
# - tensor_parallel: 16 model shards repeat each of the 8 kv heads; batch split with 2 kv heads per
#   device (4, 4); data=16 cannot split the 8 sequences, so the batch stays whole and nothing is
#   split (the same program under expert_parallel's (16, 1)).
# - expert_parallel: 1 expert per device (2, 8); 4 experts and 4 kv heads per device, batch 1 per
#   data shard (8, 2).
# - expert_tensor_parallel: model=8 (1 kv head per device); all three axes > 1 (2, 2, 4); 1 expert
#   per expert shard (1, 8, 2).
# - replicated: every parameter and activation whole, so every mesh runs the same program.
MESHES = {
    "tensor_parallel": [(1, 16), (4, 4), (16, 1)],
    "expert_parallel": [(2, 8), (8, 2)],
    "expert_tensor_parallel": [(1, 2, 8), (2, 2, 4), (1, 8, 2)],
    "replicated": [(4, 4)],
}
CASES = [(rules, shape) for rules, shapes in MESHES.items() for shape in shapes]


def test_every_shipped_rules_file_is_tested():
    assert sorted(MESHES) == sorted(p.stem for p in RULES_DIR.glob("*.toml"))


def random_model(config):
    return weights.stack_layers(weights.random_params(config, 0), config.num_layers)


@pytest.fixture(scope="module")
def host_params():
    return random_model(CONFIG)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(3, CONFIG.vocab_size, (8, 16)).astype(np.int32)


def sharder_for(rules: str, shape: tuple[int, ...]) -> Sharder:
    loaded = load_rules(rules)
    return Sharder(loaded, mesh_of(dict(zip(loaded.axes, shape)), jax.devices()[: math.prod(shape)]))


def sharded(rules: str, data: int, model_size: int, host_params, config=CONFIG) -> tuple[Sharder, dict]:
    return placed(sharder_for(rules, (data, model_size)), host_params, config)


def placed(sharder: Sharder, host_params, config=CONFIG) -> tuple[Sharder, dict]:
    return sharder, place_params(host_params, sharder.param_shardings(weights.model_shapes(config)))


def full_logits(sharder, params, tokens, config=CONFIG):
    apply = transformer.build(config, constrain=sharder.constrain).apply
    fn = jax.jit(lambda p, t: apply(p, t).logits, out_shardings=sharder.replicated())
    return np.asarray(fn(params, sharder.put(tokens, "tokens")), np.float32)


def cached_logits(sharder, params, tokens, config=CONFIG, prompt_len=12):
    """Prefill the first `prompt_len` tokens, then decode the rest one by one from the cache."""
    apply = jax.jit(transformer.build(config, constrain=sharder.constrain).apply)
    b, t = tokens.shape
    put = sharder.put
    shape = transformer.cache_shape(config, b, 32, sharder.cache_heads(config))
    memory = transformer.KVMemory(
        k=sharder.zeros_cache(shape),
        v=sharder.zeros_cache(shape),
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


def single_device_logits(config, host, tokens):
    sharder, params = placed(sharder_for("replicated", (1, 1)), host, config)
    return full_logits(sharder, params, tokens, config), cached_logits(sharder, params, tokens, config)


@pytest.fixture(scope="module")
def single_device(host_params, tokens):
    return single_device_logits(CONFIG, host_params, tokens)


@pytest.mark.parametrize("rules,shape", CASES)
def test_sharded_matches_single_device(rules, shape, host_params, tokens, single_device):
    """Full forward and cached decode on a 16-device mesh equal one device."""
    sharder, params = placed(sharder_for(rules, shape), host_params)
    assert_close(full_logits(sharder, params, tokens), single_device[0])
    assert_close(cached_logits(sharder, params, tokens), single_device[1])


@pytest.mark.parametrize("q_heads,cache_heads,per_device", [(4, 2, 2), (8, 8, 1)])
def test_kv_cache_with_fewer_kv_heads_than_model_shards(q_heads, cache_heads, per_device):
    """2 kv heads on 8 model shards: with G = 2 query heads each they cannot take 4 copies, so the
    heads stay whole (the cache replicated); with G = 4 each is repeated 4 times, one per device."""
    config = PRESETS["tiny"].replace(num_q_heads=q_heads)
    sharder = sharder_for("tensor_parallel", (1, 8))
    assert sharder.cache_heads(config) == cache_heads
    cache = sharder.zeros_cache(transformer.cache_shape(config, 8, 32, cache_heads))
    assert cache.addressable_shards[0].data.shape[2] == per_device


def test_kv_heads_kept_whole_give_the_single_device_logits(tokens):
    """4 query heads on 8 model shards keep their 2 kv heads whole (the reference splits such a model
    by weight columns). Repeated kv heads run above (8 repeated twice on tensor_parallel's (1, 16))
    and, 2 of them 4 times on model=8, in test_distributed's 4 x 4 processes (expert_tensor_parallel,
    whose attention rules are tensor_parallel's)."""
    config = PRESETS["tiny"].replace(num_q_heads=4)
    host = random_model(config)
    expected = single_device_logits(config, host, tokens)
    sharder, params = placed(sharder_for("tensor_parallel", (1, 8)), host, config)
    assert_close(full_logits(sharder, params, tokens, config), expected[0])
    assert_close(cached_logits(sharder, params, tokens, config), expected[1])


def test_weights_are_really_split(host_params):
    """On (1, 8) under tensor_parallel each device holds 1/8 of an expert matrix and of the 8 scale blocks."""
    _, params = sharded("tensor_parallel", 1, 8, host_params)
    w = params["transformer/decoder_layer/moe/linear_1"]["w"]
    assert w.weight.addressable_shards[0].data.shape == (2, 8, CONFIG.ffn_size // 8, 64)
    assert w.scales.addressable_shards[0].data.shape == (2, 8, 1, 64)
    # (Fewer scale blocks than shards, the blocks kept whole: test_scale_blocks, bit for bit.)


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


def test_activations_bend_only_on_batch_and_heads(tmp_path, host_params):
    sharder, _ = sharded("tensor_parallel", 8, 1, host_params)
    # A single sequence (prefill) keeps its batch axis whole; eight are split over `data`.
    assert sharder.put(np.zeros((1, 4), np.int32), "tokens").sharding.spec == PartitionSpec(None, None)
    assert sharder.put(np.zeros((8, 4), np.int32), "tokens").sharding.spec == PartitionSpec("data", None)
    sharder = sharder_for("tensor_parallel", (1, 8))
    # 4 heads on model=8: kept whole on every device, not an error.
    assert sharder.activation("heads", (1, 3, 4, 8)).spec == PartitionSpec("data", None, None, None)
    assert sharder.activation("heads", (1, 3, 16, 8)).spec == PartitionSpec("data", None, "model", None)
    sharder.check_activations(PRESETS["tiny"])
    # Any other dimension must divide.
    emb_split = "\n".join(f"{n} = []" for n in ("tokens", "heads", "kv_cache", "logits")) + '\nresidual = ["-", "-", "model"]'
    sharder = Sharder(load_rules(write_rules(tmp_path, ALL_PARAMS, emb_split)), make_mesh(1, 16))
    with pytest.raises(ShardingError, match=re.escape("activation 'residual': dimension of size 8 of shape (1, 1, 8)")):
        sharder.check_activations(PRESETS["tiny"].replace(emb_size=8))


@pytest.mark.parametrize(
    "q_heads,kv_heads,model_size,expected",
    [(48, 8, 8, 8), (48, 8, 16, 16), (48, 8, 32, 8), (48, 8, 4, 8), (4, 2, 8, 2), (8, 2, 8, 8), (16, 2, 4, 4)],
)
def test_cache_heads(q_heads, kv_heads, model_size, expected):
    config = PRESETS["grok-1"].replace(num_q_heads=q_heads, num_kv_heads=kv_heads)
    mesh = AbstractMesh((1, model_size), ("data", "model"))  # only its shape matters
    assert Sharder(load_rules("tensor_parallel"), mesh).cache_heads(config) == expected


def test_unknown_rules_and_bad_meshes(tmp_path):
    with pytest.raises(ShardingError, match=r"unknown partition rules 'fsdp': shipped ones are \['expert_parallel'"):
        load_rules("fsdp")
    with pytest.raises(ShardingError, match="does not exist"):
        load_rules("/nonexistent/rules.toml")
    with pytest.raises(ShardingError, match="needs 6 devices, there are 16"):
        mesh_of({"data": 2, "model": 3})
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    for bad in ("data=0,model=8", "model=x,data=1", "data=1,data=2", "data 1"):
        with pytest.raises(ShardingError, match=re.escape(f"--mesh {bad!r}")):
            parse_mesh(bad)
    assert dict(make_mesh().shape) == {"data": 1, "model": 16}
    assert dict(make_mesh(1, 8).shape) == {"data": 1, "model": 8}  # the first 8 devices


def test_mesh_axes_come_from_the_rules_file(tmp_path):
    etp = load_rules("expert_tensor_parallel")
    assert etp.axes == ("data", "expert", "model")
    assert parse_mesh("model=8,data=1,expert=2", etp) == {"data": 1, "expert": 2, "model": 8}  # mesh order
    for bad in ("data=1,model=16", "data=1,expert=2,model=8,pipeline=1"):
        with pytest.raises(ShardingError, match=f"--mesh {bad!r} does not match .*expert_tensor_parallel.toml, whose mesh axes are data, expert, model"):
            parse_mesh(bad, etp)
    with pytest.raises(ShardingError, match="mesh data=1,model=16 does not match .*expert_tensor_parallel.toml"):
        Sharder(etp, make_mesh(1, 16))
    assert load_rules("tensor_parallel").axes == ("data", "model")
    path = write_rules(tmp_path, '".*" = ["-", "expert"]')
    with pytest.raises(ShardingError, match=r"unknown mesh axis 'expert' \(the file's mesh axes are \('data', 'model'\)\)"):
        load_rules(path)
    with open(path, "a") as f:
        f.write('[mesh]\naxes = ["data", "data"]\n')
    with pytest.raises(ShardingError, match=re.escape("[mesh] must be `axes = ")):
        load_rules(path)
