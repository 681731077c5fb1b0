"""Config presets and JSON files; the SentencePiece tokenizer and the demo's byte tokenizer."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from grok.model.config import PRESETS, ffn_size, load_config
from grok.serving.tokenizer import ByteTokenizer, SentencePieceTokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "grok-1" / "tokenizer.model"


def test_grok1_preset_is_the_released_configuration():
    c = PRESETS["grok-1"]
    assert (c.emb_size, c.key_size, c.num_q_heads, c.num_kv_heads, c.num_layers) == (6144, 128, 48, 8, 64)
    assert (c.vocab_size, c.sequence_len, c.pad_token, c.eos_token) == (131072, 8192, 0, 2)
    assert (c.num_experts, c.num_selected_experts, c.ffn_size) == (8, 2, 32768)
    assert c.attn_output_multiplier == pytest.approx(128**-0.5)
    assert c.embedding_multiplier_scale == pytest.approx(6144**0.5)
    assert c.output_multiplier_scale == pytest.approx(3**-0.5)


def test_ffn_size_rounds_up_to_a_multiple_of_8():
    assert ffn_size(6144, 8) == 32768
    assert ffn_size(64, 2.0) == 88  # int(128) * 2 // 3 = 85 -> 88


def test_json_config_round_trip(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(PRESETS["tiny"].to_json())
    assert load_config(path) == PRESETS["tiny"]
    assert load_config(str(path)) == PRESETS["tiny"]
    assert load_config("grok-1") is PRESETS["grok-1"]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(hidden_size=3), "unknown config field(s): hidden_size"),
        (lambda d: d.pop("key_size"), "missing config field(s): key_size"),
        (lambda d: d.update(num_kv_heads=3), "multiple of num_kv_heads"),
        (lambda d: d.update(emb_size="big"), "emb_size must be an integer, got 'big'"),
    ],
)
def test_bad_json_config_names_the_field(tmp_path, change, message):
    fields = dataclasses.asdict(PRESETS["tiny"])
    change(fields)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_kv_heads", 0, "num_kv_heads must be > 0, got 0"),
        ("num_layers", 0, "num_layers must be > 0, got 0"),
        ("num_layers", 4.0, "num_layers must be an integer, got 4.0"),
        ("num_layers", 4.5, "num_layers must be an integer, got 4.5"),
        ("emb_size", -256, "emb_size must be > 0, got -256"),
        ("emb_size", True, "emb_size must be an integer, got True"),
        ("widening_factor", float("nan"), "widening_factor must be finite, got nan"),
        ("widening_factor", 0.001,
         "widening_factor (0.001) x emb_size (64) must give a finite feed-forward width >= 1"),
        ("attn_output_multiplier", float("inf"), "attn_output_multiplier must be finite, got inf"),
        ("output_multiplier_scale", 0, "output_multiplier_scale must be > 0, got 0"),
        ("embedding_multiplier_scale", "8", "embedding_multiplier_scale must be a number, got '8'"),
        ("sequence_len", 0, "sequence_len must be > 0, got 0"),
        ("num_experts", 0, "num_experts must be > 0, got 0"),
        ("pad_token", -1, "pad_token must be >= 0, got -1"),
        ("vocab_size", None, "vocab_size must be an integer, got None"),
    ],
)
def test_numeric_config_errors_name_the_field_and_the_file(tmp_path, field, value, message):
    """Checked field by field when the config is made: before a checkpoint is opened or a model traced."""
    fields = dataclasses.asdict(PRESETS["tiny"])
    fields[field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(fields))  # NaN and Infinity as Python's json writes and reads them
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert f"{path}: invalid config: {message}" in str(info.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        PRESETS["tiny"].replace(**{field: value})


def test_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "utf16.json"
    path.write_bytes(PRESETS["tiny"].to_json().encode("utf-16"))  # as some editors save it
    with pytest.raises(ValueError, match=f"config file {re.escape(str(path))} is not UTF-8 text"):
        load_config(path)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ValueError, match="unknown config 'grok-3'"):
        load_config("grok-3")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_config("nope.json")


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="needs ../shared/grok-1/tokenizer.model")
def test_sentencepiece_test_vector():
    tokenizer = SentencePieceTokenizer(TOKENIZER)
    assert tokenizer.vocab_size == 131072
    assert tokenizer.encode("hello world") == [21560, 1135]  # no BOS
    assert tokenizer.decode([21560, 1135]) == "hello world"


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file .*missing.model does not exist"):
        SentencePieceTokenizer(tmp_path / "missing.model")


def test_byte_tokenizer_uses_the_release_byte_ids():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("hé")
    assert ids == [69 + ord("h"), 69 + 0xC3, 69 + 0xA9]
    assert tokenizer.decode(ids + [2, 0]) == "hé"  # special ids are dropped
    assert tokenizer.vocab_size <= PRESETS["demo"].vocab_size
