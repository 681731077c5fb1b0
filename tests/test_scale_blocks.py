"""8-bit weights whose scales have any number of row blocks nb dividing the input size, as the file has them.

Checkpoints are written with nb blocks for every 8-bit weight (`weights.random_params`: each block
of scales differs), in both formats, then loaded onto 1 and 8 devices. The logits must equal,
bit for bit, those of the same model run on float weights dequantized here in NumPy
(`numpy_reference.dequantize`, row block b = rows b*in/nb .. (b+1)*in/nb - 1): scales put on the
wrong rows, or the release's block count assumed, change them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from numpy_reference import dequantize
from param_checks import assert_same_params

from grok import PRESETS
from grok.checkpoint import files, hub, pickles
from grok.checkpoint.convert import convert
from grok.checkpoint.files import SAFETENSORS_INDEX, CheckpointError, tensor_file_name
from grok.checkpoint.loader import load_sharded, place_params
from grok.checkpoint.pickles import ReleasePickler
from grok.checkpoint.read import read_checkpoint
from grok.checkpoint.safetensors_format import file_name, tensor_keys, write_file
from grok.model import transformer, weights
from grok.model.quant import QuantizedWeight8bit
from grok.parallel.sharding import Sharder, load_rules, make_mesh
from grok.serving.api import Grok

CONFIG = PRESETS["shard"]  # 8-bit input sizes: 64 (attention, moe/linear, moe/linear_v) and 88 (moe/linear_1)
NAMES, _ = weights.flatten(weights.checkpoint_shapes(CONFIG))
LAYOUTS = {
    "nb1": dict.fromkeys(weights.SCALE_BLOCKS, 1),  # one scale per column everywhere, moe/linear_1 included
    "nb2": dict.fromkeys(weights.SCALE_BLOCKS, 2),
    "nb8": dict.fromkeys(weights.SCALE_BLOCKS, 8),
    # Block counts that are not powers of two, split 2 blocks per device (16 over 8) or not at all.
    "mixed": {
        "multi_head_attention/query": 4,
        "multi_head_attention/key": 2,
        "multi_head_attention/value": 16,
        "multi_head_attention/linear": 16,
        "moe/linear": 64,
        "moe/linear_v": 1,
        "moe/linear_1": 11,
    },
}
MESHES = {
    "8 devices": lambda: Sharder(load_rules("tensor_parallel"), make_mesh(1, 8, jax.devices()[:8])),
}
TOKENS = np.random.default_rng(3).integers(3, CONFIG.vocab_size, CONFIG.sequence_len).astype(np.int32)
LINEAR_1 = "transformer/decoder_layer_1/moe/linear_1/w"
ATTENTION_OUT = "transformer/decoder_layer_1/multi_head_attention/linear/w"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, weights.Params]]:
    """Layout -> (directory with `ckpt-0/` and its conversion `safetensors/`, the parameters written)."""
    made = {}
    for layout, blocks in LAYOUTS.items():
        root = tmp_path_factory.mktemp(layout)
        params = weights.random_params(CONFIG, seed=5, scale_blocks=blocks)
        pickles.write_checkpoint(params, root / "ckpt-0", progress=False)
        convert(root / "ckpt-0", root / "safetensors", CONFIG, progress=False)
        made[layout] = root, params
    return made


@pytest.fixture(scope="module")
def sharders() -> dict[str, Sharder]:
    return {name: make() for name, make in MESHES.items()}


def dequantized(params: weights.Params) -> weights.Params:
    """Model tree of float weights: every 8-bit weight's value, computed in NumPy."""
    floats = {
        path: {name: dequantize(w) if isinstance(w, QuantizedWeight8bit) else w for name, w in leaves.items()}
        for path, leaves in params.items()
    }
    return weights.stack_layers(floats, CONFIG.num_layers)


@pytest.fixture(scope="module")
def reference_logits(checkpoints, sharders):
    """(layout, mesh) -> logits [T, V] of the model on the layout's weights dequantized in NumPy, laid
    out by the mesh's rules (the weights split like the 8-bit ones, so the matmuls split the same)."""
    float_shapes = weights.model_shapes(CONFIG, scale_blocks={})  # no 8-bit weight
    applies, logits = {}, {}

    def get(layout: str, mesh: str) -> np.ndarray:
        sharder = sharders[mesh]
        if mesh not in applies:
            apply = transformer.build(CONFIG, constrain=sharder.constrain).apply
            applies[mesh] = jax.jit(lambda p, t: apply(p, t).logits, out_shardings=sharder.replicated())
        if (layout, mesh) not in logits:
            floats = place_params(dequantized(checkpoints[layout][1]), sharder.param_shardings(float_shapes))
            out = applies[mesh](floats, sharder.put(TOKENS[None], "tokens"))
            logits[layout, mesh] = np.asarray(out[0], np.float32)
        return logits[layout, mesh]

    return get


# ------------------------------------------------------------------------------------ loading and logits


# Every layout on 8 devices, where the block count decides how scales split (one CPU device holds
# the CPU formats instead: `test_cpu_formats_on_one_device`).
@pytest.mark.parametrize("layout,mesh", [(layout, "8 devices") for layout in LAYOUTS])
def test_both_formats_load_and_give_the_logits_of_the_dequantized_weights(
    checkpoints, sharders, reference_logits, layout, mesh
):
    root, params = checkpoints[layout]
    sharder = sharders[mesh]
    grok = Grok.from_checkpoint(root / "ckpt-0", CONFIG, sharder=sharder, progress=False, cpu_format=False)
    from_safetensors = load_sharded(root / "safetensors", CONFIG, sharder, progress=False)

    # The scales are the file's, laid out for their block count (not the release's).
    shapes = weights.model_shapes(CONFIG, LAYOUTS[layout])
    shardings = sharder.param_shardings(shapes)
    for (path, got), other, want, sharding in zip(
        jax.tree_util.tree_leaves_with_path(grok.params),
        jax.tree.leaves(from_safetensors),
        jax.tree.leaves(shapes),
        jax.tree.leaves(shardings),
    ):
        assert got.shape == want.shape and got.dtype == want.dtype, path
        assert got.sharding == other.sharding == sharding, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(other))
    np.testing.assert_array_equal(
        np.asarray(grok.params["transformer/decoder_layer/moe/linear_1"]["w"].scales[1]),
        params["transformer/decoder_layer_1/moe/linear_1"]["w"].scales,
    )

    logits = grok.logits(TOKENS.tolist())
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, reference_logits(layout, mesh))


def test_eight_blocks_split_with_the_rows_and_others_stay_whole(checkpoints, sharders):
    """On 8 devices, row-split weights split their scales' blocks along when they divide (8, 16), else not."""
    sharder = sharders["8 devices"]
    unsplit, rows = PartitionSpec(None, None, None, None), PartitionSpec(None, None, "model", None)
    expected = {  # layout -> (attention/linear [L, nb, out], moe/linear_1 [L, E, nb, out])
        "nb1": (PartitionSpec(None, None, None), unsplit),
        "nb2": (PartitionSpec(None, None, None), unsplit),
        "nb8": (PartitionSpec(None, "model", None), rows),
        "mixed": (PartitionSpec(None, "model", None), unsplit),  # 16 blocks split, 11 not
    }
    for layout, specs in expected.items():
        params = load_sharded(checkpoints[layout][0] / "safetensors", CONFIG, sharder, progress=False)
        for path, spec in zip(("multi_head_attention/linear", "moe/linear_1"), specs):
            scales = params[f"transformer/decoder_layer/{path}"]["w"].scales
            assert scales.sharding.is_equivalent_to(NamedSharding(sharder.mesh, spec), scales.ndim), (layout, path)


def per_row_scales(params: weights.Params) -> weights.Params:
    """Model tree of the same 8-bit weights with one row of scales per input row (nb = in), made in
    NumPy: row r of block b = r // (in / nb) gets that block's scales. The same values, exactly."""

    def expand(w):
        if not isinstance(w, QuantizedWeight8bit):
            return w
        n_in, nb = w.weight.shape[-2], w.scales.shape[-2]
        return QuantizedWeight8bit(weight=w.weight, scales=np.repeat(w.scales, n_in // nb, axis=-2))

    expanded = {path: {name: expand(w) for name, w in leaves.items()} for path, leaves in params.items()}
    return weights.stack_layers(expanded, CONFIG.num_layers)


@pytest.mark.parametrize("layout", ["nb1", "mixed"])
@pytest.mark.parametrize("cpu_format", [None, True], ids=["int8 (default)", "f32"])
def test_cpu_formats_on_one_device(checkpoints, layout, cpu_format):
    """One CPU device holds a CPU format: by default the int8 one (`model.cpu_int8_params`, the
    weights as read, any block count), else the f32 one (`model.f32_params`).

    Their numbers are not bit for bit those of the scanned int8 model, so the reference is the same
    format of the same weights with per-row scales (in memory, through `Grok`)."""
    root, params = checkpoints[layout]
    grok = Grok.from_checkpoint(root / "ckpt-0", CONFIG, progress=False, cpu_format=cpu_format)
    assert not grok.scan_layers  # a CPU format
    if cpu_format is None:
        scales = grok.params["transformer/decoder_layer_1/moe/linear_1"]["w"].scales
        np.testing.assert_array_equal(np.asarray(scales), params["transformer/decoder_layer_1/moe/linear_1"]["w"].scales)
    reference = Grok(CONFIG, per_row_scales(params), cpu_format=cpu_format)
    assert not reference.scan_layers
    np.testing.assert_array_equal(grok.logits(TOKENS.tolist()), reference.logits(TOKENS.tolist()))


def test_per_column_scales_of_moe_linear_1_read_back_unchanged(checkpoints):
    """The reported case: `moe/linear_1` with scales [E, 1, out] is a valid checkpoint in both formats."""
    root, params = checkpoints["nb1"]
    for fmt in ("ckpt-0", "safetensors"):
        loaded = read_checkpoint(root / fmt, CONFIG, progress=False)
        scales = loaded["transformer/decoder_layer_0/moe/linear_1"]["w"].scales
        assert scales.shape == (CONFIG.num_experts, 1, CONFIG.emb_size)
        assert_same_params(params, loaded)


# ------------------------------------------------------------------------------------ errors


def bad_scales(params: weights.Params, name: str, blocks: int) -> QuantizedWeight8bit:
    """Weight `name` of `params` with its scales replaced by `blocks` row blocks."""
    path, leaf = name.rsplit("/", 1)
    w = params[path][leaf]
    shape = (*w.scales.shape[:-2], blocks, w.scales.shape[-1])
    return QuantizedWeight8bit(weight=w.weight, scales=np.ones(shape, ml_dtypes.bfloat16))


def replace_weight(directory: Path, name: str, weight: QuantizedWeight8bit) -> Path:
    """Overwrite weight `name` in a checkpoint of either format; returns the file written."""
    i = NAMES.index(name)
    if (directory / SAFETENSORS_INDEX).is_file():
        path = directory / file_name(i)
        write_file(path, tensor_keys(name, weight))
    else:
        path = directory / tensor_file_name(i)
        with open(path, "wb") as file:
            ReleasePickler(file).dump(weight)
    return path


def copy_of(checkpoints, layout: str, fmt: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints[layout][0] / fmt, tmp_path / fmt))


@pytest.mark.parametrize("fmt", ["ckpt-0", "safetensors"])
@pytest.mark.parametrize("name,blocks", [(ATTENTION_OUT, 3), (LINEAR_1, 16), (LINEAR_1, 0)])
def test_blocks_that_do_not_divide_the_input_are_named(checkpoints, tmp_path, fmt, name, blocks):
    directory = copy_of(checkpoints, "nb8", fmt, tmp_path)
    path = replace_weight(directory, name, bad_scales(checkpoints["nb8"][1], name, blocks))
    rows = 64 if name == ATTENTION_OUT else 88
    message = re.escape(f"{path} ({name}): expected bfloat16 scales of shape") + ".*" + re.escape(
        f"({blocks} row blocks do not divide {rows})"
    )
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(directory, CONFIG, progress=False)
    with pytest.raises(CheckpointError, match=message):
        load_sharded(directory, CONFIG, MESHES["8 devices"](), progress=False)


def test_convert_names_blocks_that_do_not_divide_the_input(checkpoints, tmp_path):
    source = copy_of(checkpoints, "nb1", "ckpt-0", tmp_path)
    path = replace_weight(source, LINEAR_1, bad_scales(checkpoints["nb1"][1], LINEAR_1, 5))
    message = re.escape(f"{path} ({LINEAR_1}): ") + ".*5 row blocks do not divide 88"
    with pytest.raises(CheckpointError, match=message):
        convert(source, tmp_path / "out", CONFIG, progress=False)


@pytest.mark.parametrize("fmt", ["ckpt-0", "safetensors"])
def test_layers_with_different_block_counts_are_named(checkpoints, tmp_path, fmt):
    """Layer 0 of moe/linear_1 has 1 block, layer 1 has 8: both valid, but they cannot be stacked."""
    directory = copy_of(checkpoints, "nb1", fmt, tmp_path)
    path = replace_weight(directory, LINEAR_1, checkpoints["nb8"][1][LINEAR_1.rsplit("/", 1)[0]]["w"])
    first = directory / (file_name if fmt == "safetensors" else tensor_file_name)(NAMES.index(LINEAR_1) - 12)
    expected = re.escape(
        f"{path} ({LINEAR_1}): scales in 8 row blocks, but {first} (transformer/decoder_layer_0/moe/linear_1/w) "
        "has 1; every layer of transformer/decoder_layer/moe/linear_1/w must have the same number"
    )
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(directory, CONFIG, progress=False)
    with pytest.raises(CheckpointError, match=expected):
        load_sharded(directory, CONFIG, MESHES["8 devices"](), progress=False)
    if fmt == "ckpt-0":
        with pytest.raises(CheckpointError, match=expected):
            convert(directory, tmp_path / "out", CONFIG, progress=False)


def test_other_scale_mismatches_stay_errors():
    want = weights.checkpoint_shapes(CONFIG)["transformer/decoder_layer_0/moe/linear_1"]["w"]  # scales (8, 8, 64)
    weight = np.zeros(want.weight.shape, np.int8)
    bf16 = ml_dtypes.bfloat16

    def check(scales: np.ndarray) -> None:
        files.check_weight("FILE (NAME)", want, QuantizedWeight8bit(weight=weight, scales=scales))

    check(np.zeros((8, 1, 64), bf16))
    check(np.zeros((8, 88, 64), bf16))  # a scale per element: valid too
    cases = [
        (np.zeros((8, 1, 32), bf16), "expected bfloat16 scales of shape (8, 1, 64), found (8, 1, 32)"),
        (
            np.zeros((8, 2, 64), np.float32),
            "expected bfloat16 scales of shape (8, 2, 64), found float32 of shape (8, 2, 64)",
        ),
        (np.zeros((4, 1, 64), bf16), "expected bfloat16 scales of shape (8, 1, 64), found (4, 1, 64)"),
        (
            np.zeros((8, 64), bf16),
            "expected bfloat16 scales of shape (8, nb, 64), nb row blocks dividing the 88 input rows; "
            "found bfloat16 of shape (8, 64) (2 dimensions, not 3)",
        ),
        (
            np.zeros((8, 3, 64), np.float32),
            "expected bfloat16 scales of shape (8, nb, 64), nb row blocks dividing the 88 input rows; "
            "found float32 of shape (8, 3, 64) (3 row blocks do not divide 88)",
        ),
    ]
    for scales, message in cases:
        with pytest.raises(CheckpointError) as err:
            check(scales)
        assert str(err.value) == f"FILE (NAME): {message}"


# ------------------------------------------------------------------------------------ convert and verify


def test_convert_again_keeps_files_with_other_block_counts(checkpoints, tmp_path, monkeypatch):
    root, _ = checkpoints["mixed"]
    out = Path(shutil.copytree(root / "safetensors", tmp_path / "safetensors"))
    mtimes = lambda: {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.name != SAFETENSORS_INDEX}
    before = mtimes()
    monkeypatch.setattr(pickles, "load_tensor", lambda path: pytest.fail(f"read {path} again"))
    convert(root / "ckpt-0", out, CONFIG, progress=False)
    assert mtimes() == before
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    arrays = jax.tree.leaves(checkpoints["mixed"][1])
    assert index["metadata"]["total_size"] == sum(array.nbytes for array in arrays)


@pytest.mark.parametrize("layout", ["nb1", "mixed"])
def test_verify_download_accepts_any_block_count(checkpoints, tmp_path, layout):
    local = tmp_path / "download"
    shutil.copytree(checkpoints[layout][0] / "ckpt-0", local / "ckpt-0")
    (local / "tokenizer.model").write_bytes(b"x")
    hub.verify_download(local, CONFIG)
    i = NAMES.index(LINEAR_1)
    truncated = local / "ckpt-0" / tensor_file_name(i)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    message = re.escape(f"1 truncated: {tensor_file_name(i)} ({LINEAR_1}: 1,000 of at least")
    with pytest.raises(CheckpointError, match=message):
        hub.verify_download(local, CONFIG)
