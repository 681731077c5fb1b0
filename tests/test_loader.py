"""Loading a release checkpoint straight into shards."""

import jax
import numpy as np
import pytest

from grok import PRESETS, checkpoint, loader, weights
from grok.demo import write_demo_checkpoint
from grok.sharding import Sharder, load_rules, make_mesh
from host_memory import LiveTensors

CONFIG = PRESETS["shard"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt-0", CONFIG)


@pytest.mark.parametrize("rules,data,model_size", [("tensor_parallel", 1, 8), ("expert_parallel", 2, 4)])
def test_sharded_load_equals_host_load(ckpt, rules, data, model_size):
    sharder = Sharder(load_rules(rules), make_mesh(data, model_size))
    loaded = loader.load_sharded(ckpt, CONFIG, sharder, progress=False)
    expected = weights.stack_layers(checkpoint.read_checkpoint(ckpt, CONFIG, progress=False), CONFIG.num_layers)
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
