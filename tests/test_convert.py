"""The safetensors checkpoint format and `convert` (grok/checkpoint/safetensors_format.py, grok/checkpoint/convert.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from blocking import call_with_timeout, make_fifo
from host_memory import LiveTensors
from param_checks import assert_same_logits, assert_same_params
from safetensors.numpy import load_file

from grok import PRESETS
from grok.checkpoint import files, loader, pickles
from grok.checkpoint.convert import convert
from grok.checkpoint.files import SAFETENSORS_INDEX, CheckpointError, checkpoint_format, resolve_checkpoint_dir
from grok.checkpoint.read import read_checkpoint
from grok.checkpoint.safetensors_format import StoredArray, file_name, write_file
from grok.model import weights
from grok.parallel.sharding import Sharder, load_rules, make_mesh

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
ELEVEN = PRESETS["tiny"].replace(num_layers=11)  # string order puts decoder_layer_10 before _2
SHARD = PRESETS["shard"]
NAMES, _ = weights.flatten(weights.checkpoint_shapes(ELEVEN))


def write_release(directory: Path, config, seed: int = 0):
    params = weights.random_params(config, seed)
    pickles.write_checkpoint(params, directory, progress=False)
    return params


@pytest.fixture(scope="module")
def eleven(tmp_path_factory):
    """An 11-layer release checkpoint, its parameters, and its conversion (made once; copy to change)."""
    root = tmp_path_factory.mktemp("eleven")
    params = write_release(root / "ckpt-0", ELEVEN, seed=2)
    convert(root / "ckpt-0", root / "safetensors", ELEVEN, progress=False)
    return root, params


@pytest.fixture
def converted(eleven, tmp_path) -> Path:
    return Path(shutil.copytree(eleven[0] / "safetensors", tmp_path / "safetensors"))


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("config", [TINY, ELEVEN], ids=["tiny", "11-layers"])
def test_round_trip_gives_identical_parameters_and_logits(config, tmp_path):
    params = write_release(tmp_path / "ckpt-0", config, seed=1)
    assert convert(tmp_path / "ckpt-0", tmp_path / "out", config, progress=False) == tmp_path / "out"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [SAFETENSORS_INDEX] + [file_name(i) for i in range(len(weights.flatten(params)[0]))]
    )
    from_pickles = read_checkpoint(tmp_path / "ckpt-0", config, progress=False)
    from_safetensors = read_checkpoint(tmp_path / "out", config, progress=False)
    assert_same_params(params, from_safetensors)
    assert_same_params(from_pickles, from_safetensors)

    assert_same_logits(config, from_pickles, from_safetensors)


def test_files_are_plain_safetensors_named_by_parameter(eleven):
    root, params = eleven
    name = "transformer/decoder_layer_10/moe/linear_1/w"
    index = json.loads((root / "safetensors" / SAFETENSORS_INDEX).read_text())
    stored_in = index["weight_map"][f"{name}.weight"]
    assert stored_in == index["weight_map"][f"{name}.scales"] == file_name(NAMES.index(name))
    assert index["metadata"]["total_size"] == sum(
        x.nbytes for x in jax.tree.leaves(params)
    )
    # The safetensors library reads the files by itself, int8 and bf16 unchanged.
    tensors = load_file(root / "safetensors" / stored_in)
    want = params["transformer/decoder_layer_10/moe/linear_1"]["w"]
    assert set(tensors) == {f"{name}.weight", f"{name}.scales"}
    assert tensors[f"{name}.weight"].dtype == np.int8 and tensors[f"{name}.scales"].dtype == want.scales.dtype
    np.testing.assert_array_equal(tensors[f"{name}.weight"], want.weight)
    np.testing.assert_array_equal(tensors[f"{name}.scales"], want.scales)
    embeddings = load_file(root / "safetensors" / file_name(0))["language_model/in_out_embed/embeddings"]
    np.testing.assert_array_equal(embeddings, params["language_model/in_out_embed"]["embeddings"])


# ------------------------------------------------------------------------------------ sharded loading


@pytest.fixture(scope="module")
def shard_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    write_release(root / "ckpt-0", SHARD)
    convert(root / "ckpt-0", root / "safetensors", SHARD, progress=False)
    return root


@pytest.mark.parametrize("rules,data,model_size", [("tensor_parallel", 1, 8), ("expert_parallel", 2, 4)])
def test_sharded_load_from_safetensors_equals_pickle_load(shard_checkpoint, rules, data, model_size):
    sharder = Sharder(load_rules(rules), make_mesh(data, model_size))
    from_pickles = loader.load_sharded(shard_checkpoint / "ckpt-0", SHARD, sharder, progress=False)
    from_safetensors = loader.load_sharded(shard_checkpoint / "safetensors", SHARD, sharder, progress=False)
    shardings = sharder.param_shardings(weights.model_shapes(SHARD))
    for (path, got), want, sharding in zip(
        jax.tree_util.tree_leaves_with_path(from_safetensors), jax.tree.leaves(from_pickles), jax.tree.leaves(shardings)
    ):
        assert got.sharding == sharding == want.sharding, path
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def record_reads(monkeypatch) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of what each stored tensor is asked for, by tensor name."""
    reads: dict[str, list[tuple[int, ...]]] = {}
    original = StoredArray.__getitem__

    def recording(self, index):
        result = original(self, index)
        reads.setdefault(self.key, []).append(result.shape)
        return result

    monkeypatch.setattr(StoredArray, "__getitem__", recording)
    return reads


def test_one_process_reads_each_tensor_once_and_whole(shard_checkpoint, monkeypatch):
    """With every device in this process, each tensor is needed whole: one sequential read each."""
    reads = record_reads(monkeypatch)
    sharder = Sharder(load_rules("tensor_parallel"), make_mesh(1, 8))
    loader.load_sharded(shard_checkpoint / "safetensors", SHARD, sharder, progress=False)
    _, expected, _ = files.expected_weights(SHARD)
    shapes = [tuple(a.shape) for a in jax.tree.leaves(list(expected))]
    assert sorted(shape for shape_list in reads.values() for shape in shape_list) == sorted(shapes)


_WORKER = """
import json, sys
from grok.parallel import distributed

coordinator, process_id, directory, config_file = sys.argv[1:]
distributed.initialize(coordinator, 2, int(process_id), local_device_count=4)

import jax
import numpy as np
from grok.checkpoint import loader
from grok.checkpoint.read import read_checkpoint
from grok.checkpoint.safetensors_format import StoredArray
from grok.model import weights
from grok.model.config import load_config
from grok.parallel.sharding import Sharder, load_rules, make_mesh

config = load_config(config_file)
read = {}
original = StoredArray.__getitem__

def recording(self, index):
    result = original(self, index)
    read[self.key] = read.get(self.key, 0) + result.nbytes
    return result

StoredArray.__getitem__ = recording
params = loader.load_sharded(directory, config, Sharder(load_rules("tensor_parallel"), make_mesh(1, 8)), progress=False)
read_by_load = dict(read)
expected = weights.stack_layers(read_checkpoint(directory, config, progress=False), config.num_layers)
wrong = [
    str(path) for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected))
    for shard in got.addressable_shards if not np.array_equal(np.asarray(shard.data), want[shard.index])
]
print(json.dumps({"read": read_by_load, "wrong": wrong}))
"""


def test_each_of_two_processes_reads_only_its_shards(shard_checkpoint, tmp_path):
    """Two processes of 4 CPU devices each load a (1, 8) tensor-parallel mesh from safetensors: each
    reads half of every split tensor (replicated ones whole), and holds the right values."""
    (tmp_path / "worker.py").write_text(_WORKER)
    (tmp_path / "config.json").write_text(SHARD.to_json())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROK_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    args = [str(shard_checkpoint / "safetensors"), str(tmp_path / "config.json")]
    workers = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), coordinator, str(i), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for process in workers:
            out, err = process.communicate(timeout=240)
            assert process.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()

    _, expected, _ = files.expected_weights(SHARD)
    total = sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(list(expected)))
    moe = "transformer/decoder_layer_1/moe/linear/w.weight"  # [E, D, F], F split over 8 devices
    moe_bytes = SHARD.num_experts * SHARD.emb_size * SHARD.ffn_size
    for result in results:
        assert result["wrong"] == []
        assert result["read"][moe] == moe_bytes // 2
        assert result["read"]["language_model/rms_norm/scale"] == SHARD.emb_size * 4  # replicated: whole
        assert sum(result["read"].values()) < 0.6 * total


def test_host_memory_holds_one_source_file_while_converting(tmp_path, monkeypatch):
    write_release(tmp_path / "ckpt-0", TINY)
    live = LiveTensors(monkeypatch)
    convert(tmp_path / "ckpt-0", tmp_path / "out", TINY, progress=False)
    assert live.reads == len(weights.flatten(weights.checkpoint_shapes(TINY))[0])
    assert live.peak <= 1, f"{live.peak} earlier tensors still held when reading the next"


# ------------------------------------------------------------------------------------ resuming


class Interrupted(Exception):
    pass


def test_interrupted_conversion_resumes_and_gives_identical_output(eleven, tmp_path, monkeypatch):
    root, _ = eleven
    out = tmp_path / "out"
    original, calls = pickles.load_tensor, []

    def failing_after(k):
        def load(path):
            if len(calls) == k:
                raise Interrupted
            calls.append(Path(path).name)
            return original(path)

        return load

    monkeypatch.setattr(pickles, "load_tensor", failing_after(20))
    with pytest.raises(Interrupted):
        convert(root / "ckpt-0", out, ELEVEN, progress=False)
    assert sorted(os.listdir(out)) == [file_name(i) for i in range(20)]  # whole files only, no index
    with pytest.raises(CheckpointError, match=f"{out} holds .safetensors files but no {SAFETENSORS_INDEX}"):
        read_checkpoint(out, ELEVEN, progress=False)

    # What a killed process could also leave: a temporary file, and an output file that is damaged.
    (out / f".{file_name(20)}.tmp12345").write_bytes(b"partial")
    damaged = out / file_name(7)
    damaged.write_bytes(damaged.read_bytes()[:-10])

    calls.clear()
    monkeypatch.setattr(pickles, "load_tensor", failing_after(-1))
    convert(root / "ckpt-0", out, ELEVEN, progress=False)
    expected_reads = [files.tensor_file_name(7)] + [files.tensor_file_name(i) for i in range(20, len(NAMES))]
    assert calls == expected_reads  # only what was not yet converted (or was damaged)
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    reference = root / "safetensors"  # converted in one go
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    for name in os.listdir(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_running_convert_again_rewrites_nothing(eleven, converted, monkeypatch):
    root, _ = eleven
    monkeypatch.setattr(pickles, "load_tensor", lambda path: pytest.fail(f"read {path} again"))
    convert(root, converted, ELEVEN, progress=False)  # root/ckpt-0 is the source, though root/safetensors exists
    assert checkpoint_format(converted) == "safetensors"


def test_output_of_another_checkpoint_is_refused_and_kept(eleven, converted, tmp_path):
    """Converting B into A's output (same config: same names, dtypes and shapes) must not keep A's files."""
    root, params = eleven
    other = write_release(tmp_path / "b" / "ckpt-0", ELEVEN, seed=5)
    before = {name: (converted / name).read_bytes() for name in os.listdir(converted)}
    with pytest.raises(CheckpointError) as info:
        convert(tmp_path / "b", converted, ELEVEN, progress=False)
    message = str(info.value)
    assert f"{converted} holds a conversion of {(root / 'ckpt-0').resolve()}" in message
    assert f"not of {(tmp_path / 'b' / 'ckpt-0').resolve()}" in message
    # Nothing was touched: the output is still A's finished conversion.
    assert {name: (converted / name).read_bytes() for name in os.listdir(converted)} == before
    assert_same_params(params, read_checkpoint(converted, ELEVEN, progress=False))
    # An interrupted conversion of A (no index yet) is refused the same way.
    (converted / SAFETENSORS_INDEX).unlink()
    with pytest.raises(CheckpointError, match="holds a conversion of"):
        convert(tmp_path / "b", converted, ELEVEN, progress=False)
    # Into a directory of its own, B converts, and its values are B's.
    convert(tmp_path / "b", tmp_path / "b-out", ELEVEN, progress=False)
    assert_same_params(other, read_checkpoint(tmp_path / "b-out", ELEVEN, progress=False))


def test_files_whose_source_changed_are_converted_again(tmp_path, monkeypatch):
    """A source file rewritten since its conversion (same name, dtype and shape) is converted again."""
    write_release(tmp_path / "ckpt-0", TINY, seed=1)
    convert(tmp_path / "ckpt-0", tmp_path / "out", TINY, progress=False)
    write_release(tmp_path / "new", TINY, seed=2)
    changed = [1, 4]
    for name in map(files.tensor_file_name, changed):  # replaced in place, as a second download would
        shutil.copyfile(tmp_path / "new" / name, tmp_path / "ckpt-0" / name)
    original, reads = pickles.load_tensor, []
    monkeypatch.setattr(pickles, "load_tensor", lambda path: reads.append(Path(path).name) or original(path))
    convert(tmp_path / "ckpt-0", tmp_path / "out", TINY, progress=False)
    assert reads == [files.tensor_file_name(i) for i in changed]
    monkeypatch.undo()
    assert_same_params(read_checkpoint(tmp_path / "ckpt-0", TINY, progress=False),
                       read_checkpoint(tmp_path / "out", TINY, progress=False))


# ------------------------------------------------------------------------------------ detection


def test_format_is_detected(eleven, tmp_path):
    root, params = eleven
    assert checkpoint_format(root / "ckpt-0") == "pickle"
    assert checkpoint_format(root / "safetensors") == "safetensors"
    # The parent directory prefers a finished conversion over the release files...
    assert resolve_checkpoint_dir(root) == root / "safetensors"
    assert_same_params(params, read_checkpoint(root, ELEVEN, progress=False))
    # ...but not an unfinished one.
    shutil.copytree(root / "ckpt-0", tmp_path / "ckpt-0")
    shutil.copytree(root / "safetensors", tmp_path / "safetensors")
    (tmp_path / "safetensors" / SAFETENSORS_INDEX).unlink()
    assert resolve_checkpoint_dir(tmp_path) == tmp_path / "ckpt-0"
    assert files.find_checkpoint_dir(root) == root / "safetensors"
    assert files.find_checkpoint_dir(tmp_path / "safetensors") is None  # unfinished
    assert files.find_checkpoint_dir(tmp_path / "nowhere") is None


def test_convert_refuses_wrong_inputs(eleven, converted, tmp_path):
    root, _ = eleven
    with pytest.raises(CheckpointError, match="already in the safetensors format"):
        convert(converted, tmp_path / "again", ELEVEN, progress=False)
    with pytest.raises(CheckpointError, match="needs an output directory other than its input"):
        convert(root / "ckpt-0", root / "ckpt-0", ELEVEN, progress=False)
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "tensor00000_000").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds release tensor files"):
        convert(root / "ckpt-0", tmp_path / "release", ELEVEN, progress=False)
    ten = ELEVEN.replace(num_layers=10)
    write_release(tmp_path / "ten", ten)
    with pytest.raises(CheckpointError, match=r"already holds files of another checkpoint \(tensor00122.safetensors"):
        convert(tmp_path / "ten", converted, ten, progress=False)
    with pytest.raises(CheckpointError) as info:
        convert(root / "ckpt-0", tmp_path / "out", ELEVEN.replace(emb_size=32), progress=False)
    assert (
        "tensor00000_000 (language_model/in_out_embed/embeddings): "
        "expected float32 array of shape (256, 32), found (256, 64)"
    ) in str(info.value)


# ------------------------------------------------------------------------------------ damage


def test_missing_file_is_named(converted):
    path = converted / file_name(5)
    path.unlink()
    with pytest.raises(CheckpointError, match=f"{path} is missing"):
        read_checkpoint(converted, ELEVEN, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_named(converted, damage):
    path = converted / file_name(7)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not safetensors at all", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{path}: not a valid safetensors file"):
        read_checkpoint(converted, ELEVEN, progress=False)
    sharder = Sharder(load_rules("replicated"), make_mesh(1, 1, jax.devices()[:1]))
    with pytest.raises(CheckpointError, match=f"{path}: not a valid safetensors file"):
        loader.load_sharded(converted, ELEVEN, sharder, progress=False)


def test_fifo_in_place_of_a_tensor_file_is_refused_without_blocking(eleven, converted, tmp_path):
    release = make_fifo(tmp_path / "fifo")
    path = converted / file_name(1)
    path.unlink()
    path.symlink_to(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match=f"{path}: is a FIFO, not a regular file"):
        call_with_timeout(lambda: read_checkpoint(converted, ELEVEN, progress=False), 20, on_timeout=release)
    # The source of a conversion, too.
    source = Path(shutil.copytree(eleven[0] / "ckpt-0", tmp_path / "ckpt-0"))
    path = source / files.tensor_file_name(1)
    path.unlink()
    path.symlink_to(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match=f"{path}: is a FIFO, not a regular file"):
        call_with_timeout(lambda: convert(source, tmp_path / "out", ELEVEN, progress=False), 20, on_timeout=release)


def test_header_that_does_not_fit_the_data_is_refused(converted):
    path = converted / file_name(1)  # language_model/rms_norm/scale, [64] float32
    header = json.dumps({"language_model/rms_norm/scale": {"dtype": "F32", "shape": [64], "data_offsets": [0, 200]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(200))
    with pytest.raises(CheckpointError, match=f"{path}: not a valid safetensors file .*range 0..200, expected 0..256"):
        read_checkpoint(converted, ELEVEN, progress=False)


def test_wrong_config_names_file_and_parameter(converted):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(converted, ELEVEN.replace(emb_size=32), progress=False)
    assert (
        f"{converted / file_name(0)} (language_model/in_out_embed/embeddings): "
        "expected float32 array of shape (256, 32), found (256, 64)"
    ) in str(info.value)
    config = ELEVEN.replace(key_size=8, attn_output_multiplier=8**-0.5)
    name = "transformer/decoder_layer_0/multi_head_attention/key/w"
    with pytest.raises(CheckpointError, match=f"{file_name(NAMES.index(name))} \\({name}\\): expected int8 weight"):
        read_checkpoint(converted, config, progress=False)
    with pytest.raises(CheckpointError, match="unexpected weight transformer/decoder_layer_10/.*expected 122 weights"):
        read_checkpoint(converted, ELEVEN.replace(num_layers=10), progress=False)


def test_damaged_index_is_named(converted):
    index = converted / SAFETENSORS_INDEX
    content = json.loads(index.read_text())
    del content["weight_map"]["language_model/rms_norm/scale"]
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"{index}: has no entry for language_model/rms_norm/scale"):
        read_checkpoint(converted, ELEVEN, progress=False)
    content["weight_map"]["language_model/rms_norm/scale"] = "../../etc/passwd"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="maps to '../../etc/passwd', not a .safetensors file in this directory"):
        read_checkpoint(converted, ELEVEN, progress=False)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{index}: not a readable index"):
        read_checkpoint(converted, ELEVEN, progress=False)


def test_float_tensor_where_8bit_weight_belongs(converted):
    name = "transformer/decoder_layer_0/moe/linear/w"
    path = converted / file_name(NAMES.index(name))
    write_file(path, {name: np.zeros((4, 64, 88), np.float32)})
    index = converted / SAFETENSORS_INDEX
    content = json.loads(index.read_text())
    del content["weight_map"][f"{name}.weight"], content["weight_map"][f"{name}.scales"]
    content["weight_map"][name] = path.name
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"{path} \\({name}\\): expected an 8-bit weight"):
        read_checkpoint(converted, ELEVEN, progress=False)
    # The index names a tensor its file does not hold.
    content["weight_map"][name] = file_name(0)
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"{converted / file_name(0)} \\({name}\\): holds no tensor {name}$"):
        read_checkpoint(converted, ELEVEN, progress=False)
