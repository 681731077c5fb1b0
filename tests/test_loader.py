"""Loading a release checkpoint straight into shards, or one tensor at a time onto one device."""

import shutil

import jax
import numpy as np
import pytest
from host_memory import LiveTensors

from grok import PRESETS
from grok.checkpoint import files, loader, pickles
from grok.checkpoint.convert import convert
from grok.checkpoint.demo import write_demo_checkpoint
from grok.checkpoint.read import read_checkpoint
from grok.model import transformer, weights
from grok.model.quant import QuantizedWeight8bit
from grok.parallel.sharding import Sharder, load_rules, make_mesh

CONFIG = PRESETS["shard"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt-0", CONFIG)


@pytest.mark.parametrize("rules,data,model_size", [("tensor_parallel", 1, 8), ("expert_parallel", 2, 4)])
def test_sharded_load_equals_host_load(ckpt, rules, data, model_size):
    sharder = Sharder(load_rules(rules), make_mesh(data, model_size))
    loaded = loader.load_sharded(ckpt, CONFIG, sharder, progress=False)
    expected = weights.stack_layers(read_checkpoint(ckpt, CONFIG, progress=False), CONFIG.num_layers)
    shardings = sharder.param_shardings(weights.model_shapes(CONFIG))
    for (path, got), want, sharding in zip(
        jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(expected), jax.tree.leaves(shardings)
    ):
        assert got.sharding == sharding, path
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)


def test_at_most_one_tensor_file_is_alive_on_the_host(ckpt, monkeypatch):
    """Each file's host array is dropped once its shards are placed: host memory stays ~one tensor."""
    live = LiveTensors(monkeypatch)
    loader.load_sharded(ckpt, CONFIG, Sharder(load_rules("tensor_parallel"), make_mesh(1, 8)), progress=False)
    assert live.reads == len(weights.flatten(weights.checkpoint_shapes(CONFIG))[0])
    assert live.peak <= 1, f"{live.peak} earlier tensor files still held when loading the next"


# ------------------------------------------------------------------- the checkpoint tree, one device


def _one_device():
    return Sharder(load_rules("replicated"), make_mesh(1, 1, jax.devices()[:1]))


def _write(directory, scale_blocks):
    pickles.write_checkpoint(weights.random_params(CONFIG, 1, scale_blocks), directory, progress=False)
    return directory


def _assert_same_trees(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert isinstance(g, jax.Array) and g.devices() == {jax.devices()[0]}, path
        assert g.dtype == w.dtype and g.shape == w.shape, path
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))


@pytest.mark.parametrize("layout", ["release", "nb8", "nb2"])
def test_load_layers_equals_unstacked_load_sharded(tmp_path, ckpt, layout):
    """Leaf for leaf the per-layer tree of `load_sharded`: 8-bit weights with 1 and 8 scale row blocks
    (the release's layout), all 8, and all 2."""
    if layout != "release":
        ckpt = _write(tmp_path / "ckpt-0", dict.fromkeys(weights.SCALE_BLOCKS, int(layout[2:])))
    got = loader.load_layers(ckpt, CONFIG, progress=False)
    want = weights.unstack_layers(loader.load_sharded(ckpt, CONFIG, _one_device(), progress=False), CONFIG.num_layers)
    _assert_same_trees(got, want)
    assert list(got) == sorted(weights.checkpoint_shapes(CONFIG))  # release file order
    blocks = {weights.scale_block_count(w) for w in jax.tree.leaves(got, is_leaf=weights.is_weight)
              if isinstance(w, QuantizedWeight8bit)}
    assert blocks == ({1, 8} if layout == "release" else {int(layout[2:])})


def test_load_layers_reads_safetensors(tmp_path, ckpt):
    converted = convert(ckpt, tmp_path / "safetensors", CONFIG, progress=False)
    _assert_same_trees(loader.load_layers(converted, CONFIG, progress=False),
                       read_checkpoint(ckpt, CONFIG, progress=False))


def _f32_format(path, name, leaf):
    """What the single-CPU path converts each weight into (`grok.model.transformer.f32_params`, one leaf)."""
    return transformer.f32_params({path: {name: leaf}})[path][name]


@pytest.mark.parametrize(
    "convert_leaf", [None, _f32_format, transformer.cpu_int8_leaf], ids=["as read", "f32 format", "int8 format"]
)
def test_load_layers_frees_each_tensor_file_before_reading_the_next(ckpt, monkeypatch, convert_leaf):
    """No earlier tensor file is alive when the next is read: each is dropped once placed (or converted)."""
    live = LiveTensors(monkeypatch)
    loader.load_layers(ckpt, CONFIG, convert=convert_leaf, progress=False)
    assert live.reads == len(weights.flatten(weights.checkpoint_shapes(CONFIG))[0])
    assert live.peak == 0, f"{live.peak} earlier tensor files still held when loading the next"


def test_grok_on_one_cpu_loads_the_int8_format(ckpt, monkeypatch):
    """`Grok.from_checkpoint` on one CPU device (the default): the int8 CPU format, read per layer
    by `load_layers` (whose memory the test above checks with this conversion), with the logits of
    the same weights held in memory."""
    from grok import Grok
    from grok.model.quant import BF16Table, Int8CpuWeight
    from grok.serving import api

    read = []

    def recording(*args, **kwargs):
        read.append(kwargs["convert"])
        return loader.load_layers(*args, **kwargs)

    monkeypatch.setattr(api, "load_layers", recording)
    grok = Grok.from_checkpoint(ckpt, CONFIG, progress=False)
    assert read == [transformer.cpu_int8_leaf] and not grok.scan_layers
    kinds = {type(leaf) for leaf in jax.tree.leaves(grok.params, is_leaf=lambda x: not isinstance(x, dict))}
    assert Int8CpuWeight in kinds and BF16Table in kinds
    in_memory = Grok(CONFIG, read_checkpoint(ckpt, CONFIG, progress=False))
    tokens = [5, 9, 3, 7]
    np.testing.assert_array_equal(grok.logits(tokens), in_memory.logits(tokens))


def test_load_layers_converts_every_leaf_once_with_its_path_and_name(ckpt):
    calls = []

    def record(path, name, leaf):
        calls.append((path, name, leaf))
        return np.full((2,), len(calls), np.int32)  # a NumPy result is placed too

    params = loader.load_layers(ckpt, CONFIG, convert=record, progress=False)
    names, expected = weights.flatten(weights.checkpoint_shapes(CONFIG))
    assert [f"{path}/{name}" for path, name, _ in calls] == names  # release file order
    for (path, name, leaf), want in zip(calls, expected):
        files.check_weight(f"{path}/{name}", want, leaf)  # the weight as read, dtypes and shapes
        leaves = jax.tree.leaves(leaf)
        assert leaves and all(type(a) is np.ndarray for a in leaves), (path, name)
    for i, (path, name, _) in enumerate(calls, 1):
        got = params[path][name]
        assert isinstance(got, jax.Array) and got.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(got, [i, i])
    # A pytree result keeps its structure; JAX arrays stay as they are.
    f32 = loader.load_layers(ckpt, CONFIG, convert=_f32_format, progress=False)
    want = transformer.f32_params(read_checkpoint(ckpt, CONFIG, progress=False))
    assert jax.tree.structure(f32) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(f32), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_placed_leaves_never_alias_host_memory():
    """`device_put` aliases a 64-byte aligned NumPy array on CPU; a placed leaf gets its own buffer."""
    buffer = np.zeros(4096 + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    host = buffer[start:start + 4096].view(np.float32)
    host[:] = np.arange(1024)
    assert jax.device_put(host).unsafe_buffer_pointer() == host.ctypes.data  # what makes this necessary
    placed = loader._own_device_buffer(host)
    assert placed.unsafe_buffer_pointer() != host.ctypes.data
    host[:] = -1
    np.testing.assert_array_equal(placed, np.arange(1024, dtype=np.float32))


def _error(load):
    with pytest.raises(files.CheckpointError) as info:
        load()
    return str(info.value)


def _both_errors(directory):
    return (_error(lambda: loader.load_layers(directory, CONFIG, progress=False)),
            _error(lambda: loader.load_sharded(directory, CONFIG, _one_device(), progress=False)))


def test_load_layers_reports_a_bad_checkpoint_as_load_sharded_does(tmp_path, ckpt):
    names, _ = weights.flatten(weights.checkpoint_shapes(CONFIG))
    missing = tmp_path / "missing"
    shutil.copytree(ckpt, missing)
    (missing / files.tensor_file_name(5)).unlink()
    layers, sharded = _both_errors(missing)
    assert layers == sharded and f"{files.tensor_file_name(5)} ({names[5]}) is missing" in layers

    wrong = tmp_path / "wrong-shape"
    shutil.copytree(ckpt, wrong)
    index = names.index("language_model/rms_norm/scale")
    with open(wrong / files.tensor_file_name(index), "wb") as file:
        pickles.ReleasePickler(file).dump(np.ones(CONFIG.emb_size + 1, np.float32))
    layers, sharded = _both_errors(wrong)
    assert layers == sharded and "expected float32 array of shape (64,), found (65,)" in layers

    # Scales in other row blocks in one layer than in another.
    mixed = tmp_path / "mixed-blocks"
    _write(mixed, weights.SCALE_BLOCKS)
    other = weights.random_params(CONFIG, 1, dict.fromkeys(weights.SCALE_BLOCKS, 2))
    index = names.index("transformer/decoder_layer_1/moe/linear/w")
    with open(mixed / files.tensor_file_name(index), "wb") as file:
        pickles.ReleasePickler(file).dump(other["transformer/decoder_layer_1/moe/linear"]["w"])
    layers, sharded = _both_errors(mixed)
    assert layers == sharded and "every layer of transformer/decoder_layer/moe/linear/w" in layers

    assert _both_errors(tmp_path / "nowhere")[0] == _both_errors(tmp_path / "nowhere")[1]


@pytest.mark.parametrize("progress", [True, False])
def test_load_layers_progress_bar(ckpt, capsys, progress):
    loader.load_layers(ckpt, CONFIG, progress=progress)
    err = capsys.readouterr().err
    assert (f"reading {ckpt}" in err) == progress
    if progress:
        assert f"{len(weights.flatten(weights.checkpoint_shapes(CONFIG))[0])}/" in err
