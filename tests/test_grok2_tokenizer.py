"""Grok-2's tokenizer (`tokenizer.tok.json`, read with tiktoken) and its chat template, on a small file in the
release's format: special tokens at ids 0, 1, 2, then the 256 single bytes, then a few merges."""

import json
import re
from pathlib import Path

import pytest

from grok.serving.chat import DEFAULT_TEMPLATE, ChatTemplate
from grok.serving.tokenizer import TiktokenTokenizer, load_tokenizer

SPECIALS = ["<|pad|>", "<|separator|>", "<|eos|>"]
PAD, SEP, EOS = range(3)
FIRST_BYTE = len(SPECIALS)  # the id of byte 0; byte b is FIRST_BYTE + b
# In merge order, each one built from two tokens before it. b"12" is there to show that digits are split.
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b"ld", b" wor", b" world", b"12"]
MERGE_ID = {m: FIRST_BYTE + 256 + i for i, m in enumerate(MERGES)}


def tok_json(**changes) -> dict:
    """A small tokenizer.tok.json as a dict; keyword arguments replace (or, set to None, remove) keys."""
    regular = [{"bytes": [b], "token": FIRST_BYTE + b} for b in range(256)]
    regular += [{"bytes": list(m), "token": MERGE_ID[m]} for m in MERGES]
    data = {
        "regular_tokens": regular,
        "special_tokens": [{"bytes": list(s.encode()), "token": i} for i, s in enumerate(SPECIALS)],
        "word_split": "V1",
        "vocab_size": len(SPECIALS) + 256 + len(MERGES),
        "default_allowed_special": [list(s.encode()) for s in SPECIALS],
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def write(tmp_path: Path, data, name: str = "tokenizer.tok.json") -> Path:
    """`data` as JSON (bytes are written as they are) in a file of that name."""
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


@pytest.fixture
def tok(tmp_path) -> TiktokenTokenizer:
    return TiktokenTokenizer(write(tmp_path, tok_json()))


def byte_ids(text: str) -> list[int]:
    return [FIRST_BYTE + b for b in text.encode()]


def test_round_trip(tok):
    text = "hello world, it's 2024!\nnaïve café — 日本語 🙂\n\n\t two  spaces \r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == 3 + 256 + len(MERGES)
    assert tok.eos_id == EOS


def test_merges_are_used_and_digits_are_split_one_by_one(tok):
    assert tok.encode("hello") == [MERGE_ID[b"hello"]]
    assert tok.encode("hello world") == [MERGE_ID[b"hello"], MERGE_ID[b" world"]]
    assert tok.encode("help") == [MERGE_ID[b"he"], *byte_ids("lp")]
    assert tok.encode("123") == byte_ids("123")  # b"12" is a token, but each digit is its own piece
    assert tok.encode("é") == byte_ids("é")  # two bytes, no merge
    assert tok.encode("") == []


def test_pat_str_overrides_the_split(tmp_path):
    tok = TiktokenTokenizer(write(tmp_path, tok_json(pat_str=r"\S+|\s+")))
    assert tok.encode("123") == [MERGE_ID[b"12"], FIRST_BYTE + ord("3")]


def test_special_token_text_encodes_as_the_special_token(tok):
    assert tok.encode("<|eos|>") == [tok.eos_id]
    assert tok.encode("Hi<|separator|>\n\n") == [*byte_ids("Hi"), SEP, *byte_ids("\n\n")]
    assert tok.encode("<|pad|><|separator|>") == [PAD, SEP]
    assert tok.encode("<|sep") == byte_ids("<|sep")
    assert tok.decode([SEP, MERGE_ID[b"hello"], EOS]) == "<|separator|>hello<|eos|>"


def test_load_tokenizer_picks_tiktoken_for_json_paths(tmp_path):
    path = write(tmp_path, tok_json())
    for spec in (path, str(path)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, TiktokenTokenizer)
        assert tok.encode("hello") == [MERGE_ID[b"hello"]]
    other = write(tmp_path, tok_json(), name="grok2-tokenizer.json")
    assert isinstance(load_tokenizer(other), TiktokenTokenizer)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.tok.json"):
        load_tokenizer(tmp_path / "nothing.tok.json")


@pytest.mark.parametrize(
    "contents,message",
    [
        (b"{not json", "not valid JSON"),
        (b'"\xff"', "not valid JSON"),  # not UTF-8
        ([1, 2], "holds a JSON object"),
        (tok_json(word_split="V2"), "unknown word_split 'V2'"),
        (tok_json(regular_tokens=None), "missing key 'regular_tokens'"),
        (tok_json(special_tokens=None), "missing key 'special_tokens'"),
        (tok_json(word_split=None), "missing key 'word_split'"),
        (tok_json(regular_tokens={"a": 1}), "'regular_tokens' must be a list"),
        (tok_json(special_tokens=[{"bytes": [60], "token": "3"}]), r"special_tokens\[0\] is not"),
        (tok_json(special_tokens=[{"bytes": [256], "token": 2}]), r"special_tokens\[0\] has a byte .* 0\.\.255"),
        (tok_json(special_tokens=[{"bytes": [0xff], "token": 2}]), "not UTF-8"),
        (tok_json(special_tokens=[{"bytes": [60], "token": 2}]), re.escape("no <|eos|>")),
        (tok_json(special_tokens=[{"bytes": list(b"<|eos|>"), "token": 3}]), "2 tokens have the id 3"),
        (tok_json(regular_tokens=[{"bytes": [b], "token": b} for b in range(255)]), "no token for the byte 255"),
        (tok_json(vocab_size=1000), "vocab_size is 1000"),
        (tok_json(pat_str="("), "Parsing error"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, contents, message):
    path = write(tmp_path, contents, name="bad.tok.json")
    with pytest.raises(ValueError, match=message) as err:
        TiktokenTokenizer(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_grok2_chat_template(tok):
    template = ChatTemplate.load(DEFAULT_TEMPLATE.parent / "grok2.json")
    prompt = template.render([("system", "Be brief."), ("user", "Hi")])
    assert prompt == "System: Be brief.<|separator|>\n\nHuman: Hi<|separator|>\n\nAssistant:"
    assert template.stop == ("<|separator|>",)
    assert template.render([("assistant", "Hello")]) == "Assistant: Hello<|separator|>\n\nAssistant:"
    assert tok.encode(prompt).count(SEP) == 2
