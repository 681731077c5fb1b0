"""Tests of the release checkpoint reader/writer (grok/checkpoint/)."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shlex
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from blocking import call_with_timeout, make_fifo
from param_checks import assert_same_logits, assert_same_params

from grok.checkpoint.files import CheckpointError, resolve_checkpoint_dir, tensor_file_name
from grok.checkpoint.pickles import ReleasePickler, UnsafePickleError, load_tensor, write_checkpoint
from grok.checkpoint.read import read_checkpoint
from grok.model import weights
from grok.model.config import PRESETS
from grok.model.quant import QuantizedWeight8bit

CONFIG = PRESETS["tiny"].replace(num_layers=11)  # 11 layers: string order puts _10 before _2
NAMES, _ = weights.flatten(weights.checkpoint_shapes(CONFIG))
RECONSTRUCT = np.empty(0).__reduce__()[0]  # the installed NumPy's multiarray._reconstruct
ALLOWED_GLOBALS = {
    f"{RECONSTRUCT.__module__}._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "ml_dtypes.bfloat16",
    "__main__.QuantizedWeight8bit",
}


@pytest.fixture(scope="module")
def params():
    return weights.random_params(CONFIG, seed=1)


@pytest.fixture(scope="module")
def written(params, tmp_path_factory) -> Path:
    """A checkpoint of `params`, written once; tests that change files work on a copy."""
    directory = tmp_path_factory.mktemp("release") / "ckpt-0"
    write_checkpoint(params, directory, progress=False)
    return directory


@pytest.fixture
def ckpt(written, tmp_path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "ckpt-0"))


def file_of(name: str) -> str:
    return tensor_file_name(NAMES.index(name))


def pickle_globals(data: bytes) -> set[str]:
    """Globals a pickle references (GLOBAL/INST, and STACK_GLOBAL from the strings it pops)."""
    found, memo, strings = set(), {}, []
    previous = None  # the string pushed by the previous opcode, if it pushed one
    for op, arg, _ in pickletools.genops(data):
        if op.name == "MEMOIZE":
            memo[len(memo)] = previous
            continue
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = previous
            continue
        pushed = None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed = arg
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(arg)
        if pushed is not None:
            strings.append(pushed)
        if op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        previous = pushed
    return found


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_is_exact_and_gives_identical_logits(params, written):
    loaded = read_checkpoint(written, CONFIG, progress=False)
    assert_same_params(params, loaded)

    assert_same_logits(CONFIG, params, loaded)


def test_files_follow_string_order_of_paths(params, written):
    assert sorted(os.listdir(written)) == [tensor_file_name(i) for i in range(2 + 12 * CONFIG.num_layers)]
    assert NAMES[0] == "language_model/in_out_embed/embeddings"
    embeddings = params["language_model/in_out_embed"]["embeddings"]
    np.testing.assert_array_equal(load_tensor(written / tensor_file_name(0)), embeddings)

    def first_of(layer: int) -> int:
        return min(i for i, n in enumerate(NAMES) if n.startswith(f"transformer/decoder_layer_{layer}/"))

    assert first_of(10) < first_of(2)
    assert first_of(1) < first_of(10)
    # The file at that index really holds layer 10's weight, not layer 2's.
    index = NAMES.index("transformer/decoder_layer_10/moe/linear/w")
    stored = load_tensor(written / tensor_file_name(index))
    np.testing.assert_array_equal(stored.weight, params["transformer/decoder_layer_10/moe/linear"]["w"].weight)


def test_written_pickles_reference_only_the_release_globals(written):
    seen = set()
    for name in os.listdir(written):
        seen |= pickle_globals((written / name).read_bytes())
    assert seen == ALLOWED_GLOBALS

    # An 8-bit file is one `__main__.QuantizedWeight8bit` whose state is the dict {weight, scales}.
    class Release:
        pass

    class MainUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("__main__", "QuantizedWeight8bit"):
                return Release
            return super().find_class(module, name)

    data = (written / file_of("transformer/decoder_layer_0/multi_head_attention/linear/w")).read_bytes()
    assert data[:2] == b"\x80\x04"  # protocol 4
    obj = MainUnpickler(io.BytesIO(data)).load()
    assert type(obj) is Release and list(vars(obj)) == ["weight", "scales"]
    assert obj.weight.dtype == np.int8 and obj.scales.dtype == ml_dtypes.bfloat16
    assert obj.scales.shape == (8, CONFIG.emb_size)


def test_writes_jax_arrays_and_leaves_no_temporary_files(tmp_path):
    config = PRESETS["tiny"]
    params = weights.random_params(config, seed=3)
    as_jax = jax.tree.map(jnp.asarray, params)
    write_checkpoint(as_jax, tmp_path / "out", progress=False)
    assert all(name.startswith("tensor") for name in os.listdir(tmp_path / "out"))
    assert_same_params(params, read_checkpoint(tmp_path / "out", config, progress=False))


def test_numpy1_pickles_load(params, ckpt):
    class NumPy1Pickler(ReleasePickler):
        global_names = {**ReleasePickler.global_names, RECONSTRUCT: ("numpy.core.multiarray", "_reconstruct")}

    for name in ("language_model/in_out_embed/embeddings", "transformer/decoder_layer_3/moe/linear_1/w"):
        path, (module_path, param) = ckpt / file_of(name), name.rsplit("/", 1)
        with open(path, "wb") as file:
            NumPy1Pickler(file).dump(params[module_path][param])
        assert "numpy.core.multiarray._reconstruct" in pickle_globals(path.read_bytes())
        assert "numpy._core.multiarray._reconstruct" not in pickle_globals(path.read_bytes())
    assert_same_params(params, read_checkpoint(ckpt, CONFIG, progress=False))


def test_rewriting_same_checkpoint_is_fine_but_another_is_refused(params, ckpt):
    write_checkpoint(params, ckpt, progress=False)
    smaller = weights.random_params(CONFIG.replace(num_layers=10))
    with pytest.raises(CheckpointError, match="already holds tensor files"):
        write_checkpoint(smaller, ckpt, progress=False)


# ------------------------------------------------------------------------------------ directories


def test_accepts_parent_directory_of_ckpt0(params, ckpt):
    assert resolve_checkpoint_dir(ckpt.parent) == ckpt
    assert resolve_checkpoint_dir(ckpt) == ckpt
    assert_same_params(params, read_checkpoint(ckpt.parent, CONFIG, progress=False))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        read_checkpoint(tmp_path / "nope", CONFIG, progress=False)


# ------------------------------------------------------------------------------------ mismatches


def test_swapped_files_are_detected(ckpt):
    a, b = ckpt / tensor_file_name(0), ckpt / tensor_file_name(1)  # embeddings [V, D] and final norm [D]
    a.rename(ckpt / "tmp")
    b.rename(a)
    (ckpt / "tmp").rename(b)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(ckpt, CONFIG, progress=False)
    message = str(info.value)
    assert "tensor00000_000 (language_model/in_out_embed/embeddings)" in message
    expected, found = (CONFIG.vocab_size, CONFIG.emb_size), (CONFIG.emb_size,)
    assert f"expected float32 array of shape {expected}, found {found}" in message


def test_float_file_where_8bit_weight_belongs(ckpt):
    quantized = ckpt / file_of("transformer/decoder_layer_0/moe/linear/w")
    shutil.copy(ckpt / file_of("transformer/decoder_layer_0/rms_norm/scale"), quantized)
    with pytest.raises(CheckpointError, match=f"{quantized.name} .*moe/linear/w.*expected an 8-bit weight"):
        read_checkpoint(ckpt, CONFIG, progress=False)


def test_missing_file_is_named(ckpt):
    (ckpt / tensor_file_name(5)).unlink()
    with pytest.raises(CheckpointError, match=f"tensor00005_000 \\({NAMES[5]}\\) is missing"):
        read_checkpoint(ckpt, CONFIG, progress=False)


def test_wrong_emb_size_names_file_and_parameter(written):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(written, CONFIG.replace(emb_size=32), progress=False)
    assert (
        "tensor00000_000 (language_model/in_out_embed/embeddings): "
        "expected float32 array of shape (256, 32), found (256, 64)"
    ) in str(info.value)


def test_wrong_key_size_names_8bit_weight(written):
    config = CONFIG.replace(key_size=8, attn_output_multiplier=8**-0.5)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(written, config, progress=False)
    name = "transformer/decoder_layer_0/multi_head_attention/key/w"
    assert f"{file_of(name)} ({name}): expected int8 weight of shape (64, 16), found (64, 32)" in str(info.value)


def test_wrong_layer_count(written):
    with pytest.raises(CheckpointError, match="expected 122 tensor files for this config, found 134"):
        read_checkpoint(written, CONFIG.replace(num_layers=10), progress=False)
    with pytest.raises(CheckpointError, match="tensor00134_000 .* is missing .*expected 146 tensor files"):
        read_checkpoint(written, CONFIG.replace(num_layers=12), progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_named(ckpt, damage):
    path = ckpt / tensor_file_name(7)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a pickle at all", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{path.name}: not a valid tensor pickle"):
        read_checkpoint(ckpt, CONFIG, progress=False)


def test_fifo_in_place_of_a_tensor_file_is_refused_without_blocking(ckpt, tmp_path):
    release = make_fifo(tmp_path / "fifo")
    path = ckpt / tensor_file_name(1)
    path.unlink()
    path.symlink_to(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match=f"{path}: is a FIFO, not a regular file"):
        call_with_timeout(lambda: read_checkpoint(ckpt, CONFIG, progress=False), 20, on_timeout=release)


def test_8bit_weight_must_hold_arrays(ckpt):
    path = ckpt / file_of("transformer/decoder_layer_0/multi_head_attention/query/w")
    with open(path, "wb") as file:
        ReleasePickler(file).dump(QuantizedWeight8bit(weight=np.zeros((64, 64), np.int8), scales=[1.0, 2.0]))
    with pytest.raises(CheckpointError, match="must hold NumPy arrays 'weight' and 'scales'"):
        read_checkpoint(ckpt, CONFIG, progress=False)


# ------------------------------------------------------------------------------------ malicious pickles


class _Call:
    """Pickles as a call of `func(*args)`: what a hostile checkpoint would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_pickles(marker: Path) -> dict[str, bytes]:
    command = f"touch {shlex.quote(str(marker))}"
    return {
        f"{os.system.__module__}.system": pickle.dumps(_Call(os.system, command), protocol=4),
        "builtins.eval": pickle.dumps(_Call(eval, f"open({str(marker)!r}, 'w').close()"), protocol=4),
        # As a hand-written pickle would spell it (protocol 0 GLOBAL opcode).
        "os.system": b"cos\nsystem\n(V" + command.encode() + b"\ntR.",
    }


def test_payloads_are_real(tmp_path):
    """Control: a plain unpickler really runs these payloads (so the next test means something)."""
    for i, data in enumerate(_malicious_pickles(tmp_path / "control").values()):
        pickle.loads(data)
        assert (tmp_path / "control").exists(), i
        (tmp_path / "control").unlink()


@pytest.mark.parametrize("index", [0, 3])
def test_malicious_pickles_are_refused_and_not_run(ckpt, tmp_path, index):
    marker = tmp_path / "pwned"
    for global_name, data in _malicious_pickles(marker).items():
        path = ckpt / tensor_file_name(index)
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError) as info:
            read_checkpoint(ckpt, CONFIG, progress=False)
        assert f"{path}: refuses to load global {global_name}" in str(info.value)
        with pytest.raises(UnsafePickleError, match=f"refuses to load global {global_name}"):
            load_tensor(path)
        assert not marker.exists()


def test_pickle_cannot_modify_the_quantized_weight_class(ckpt):
    # BUILD with slot state on the class itself would setattr on it: QuantizedWeight8bit.shape = 5.
    path = ckpt / tensor_file_name(2)
    path.write_bytes(b"c__main__\nQuantizedWeight8bit\n(N}S'shape'\nI5\nstb.")
    with pytest.raises(CheckpointError, match="not a NumPy array or QuantizedWeight8bit"):
        load_tensor(path)
    assert isinstance(QuantizedWeight8bit.shape, property)


def test_pickles_written_by_numpy_1_load_bit_exactly():
    """Golden files written as the reference wrote the release (NumPy 1.26, ml_dtypes 0.4.1,
    `numpy.core.multiarray._reconstruct`; tests/data/numpy1/write.py), read under NumPy 2."""
    data = Path(__file__).parent / "data" / "numpy1"
    quantized = load_tensor(data / "tensor00000_000")
    assert isinstance(quantized, QuantizedWeight8bit)
    np.testing.assert_array_equal(quantized.weight, np.load(data / "weight.npy"))
    assert quantized.weight.dtype == np.int8 and quantized.scales.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(quantized.scales.view(np.uint16), np.load(data / "scales_bits.npy"))
    array = load_tensor(data / "tensor00001_000")
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.load(data / "array.npy"))
