"""Text <-> token ids: Grok-1's SentencePiece model, Grok-2's tiktoken BPE, or a byte-level stand-in
for the demo."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Protocol, Sequence

import sentencepiece
import tiktoken


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """Grok-1's `tokenizer.model`. Prompts are encoded without BOS, as the reference runner does."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (see checkpoints/README.md)")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


# The split pattern that Grok-2's `"word_split": "V1"` names: words, single digits, punctuation runs, spaces.
V1_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
WORD_SPLITS = {"V1": V1_SPLIT}


class TiktokenTokenizer:
    """Grok-2's `tokenizer.tok.json`: a byte-level BPE run by `tiktoken`, read as SGLang reads it.

    The file is a JSON object: "regular_tokens" and "special_tokens" (lists of {"bytes": [0..255, ...],
    "token": id}; regular bytes are BPE merge ranks, special bytes are UTF-8 text such as "<|eos|>"),
    "word_split" ("V1"), and optionally "pat_str" (overrides the split) and "vocab_size" (checked).
    Special-token text in a prompt ("<|separator|>") encodes as that token, so chat templates can
    write it; no BOS is added. Every special token is allowed, so "default_allowed_special" is ignored.
    """

    EOS = "<|eos|>"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (Grok-2's is tokenizer.tok.json "
                                    "in the xai-org/grok-2 release)")
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}: the tokenizer file is not valid JSON: {err}") from None
        try:
            self._enc = _encoding(data, name=str(path))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        self.vocab_size: int = self._enc.n_vocab
        self.eos_id: int = self._enc.encode_single_token(self.EOS)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


def _encoding(data: Any, name: str) -> tiktoken.Encoding:
    """A `tiktoken.Encoding` from a parsed `tokenizer.tok.json`; raises ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("a tokenizer.tok.json file holds a JSON object")
    for key in ("regular_tokens", "special_tokens", "word_split"):
        if key not in data:
            raise ValueError(f"missing key {key!r}")
    if data["word_split"] not in WORD_SPLITS:
        raise ValueError(f"unknown word_split {data['word_split']!r} (known: {', '.join(WORD_SPLITS)})")
    pat_str = data.get("pat_str", WORD_SPLITS[data["word_split"]])
    if not isinstance(pat_str, str):
        raise ValueError("'pat_str' must be a string")
    ranks = _token_table(data, "regular_tokens")
    try:
        specials = {raw.decode("utf-8"): token for raw, token in _token_table(data, "special_tokens").items()}
    except UnicodeDecodeError:
        raise ValueError("a special token's bytes are not UTF-8 text") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"regular_tokens has no token for the byte {missing[0]} (a byte-level BPE needs all 256)")
    if "" in specials:
        raise ValueError("a special token is empty")
    ids = [*ranks.values(), *specials.values()]
    shared, count = Counter(ids).most_common(1)[0]
    if count > 1:
        raise ValueError(f"{count} tokens have the id {shared}")
    if TiktokenTokenizer.EOS not in specials:
        raise ValueError(f"special_tokens has no {TiktokenTokenizer.EOS}")
    n_vocab = data.get("vocab_size")
    if n_vocab is not None and (type(n_vocab) is not int or n_vocab != len(ids) or n_vocab != max(ids) + 1):
        raise ValueError(f"vocab_size is {n_vocab!r}, but the file has {len(ids)} tokens with ids up to {max(ids)}")
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials,
                             explicit_n_vocab=n_vocab)  # a bad pat_str raises ValueError here


def _token_table(data: dict, key: str) -> dict[bytes, int]:
    """The list under `key` as {token bytes: id}, checked: a list of {"bytes": [0..255, ...], "token": id}."""
    items = data[key]
    if not isinstance(items, list):
        raise ValueError(f"{key!r} must be a list of {{\"bytes\": [...], \"token\": id}} objects")
    table: dict[bytes, int] = {}
    for n, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("bytes"), list) and type(item.get("token")) is int
                and 0 <= item["token"] < 2**32):  # tiktoken keeps ids as 32-bit unsigned integers
            raise ValueError(f"{key}[{n}] is not {{\"bytes\": [0..255, ...], \"token\": id in 0..2**32-1}}")
        try:
            raw = bytes(item["bytes"])
        except (TypeError, ValueError):
            raise ValueError(f"{key}[{n}] has a byte that is not an integer in 0..255") from None
        if raw in table:
            raise ValueError(f"{key}[{n}] repeats the bytes {raw!r}")
        table[raw] = item["token"]
    return table


class ByteTokenizer:
    """One token per UTF-8 byte, at the ids the real vocabulary uses for its byte pieces (69 + byte).

    Used by the random-weight demo, which must run without the 2 MB tokenizer file.
    """

    BYTE_OFFSET = 69
    vocab_size = BYTE_OFFSET + 256

    def encode(self, text: str) -> list[int]:
        return [self.BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.BYTE_OFFSET for i in ids if self.BYTE_OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


BYTE_TOKENIZER = "bytes"  # the name that `load_tokenizer` (and --tokenizer) takes for `ByteTokenizer`


def load_tokenizer(spec: str | Path | Tokenizer) -> Tokenizer:
    """A tokenizer: the string "bytes" is `ByteTokenizer`, a path ending in ".json" (Grok-2's
    `tokenizer.tok.json`) a `TiktokenTokenizer`, any other string or path a SentencePiece model file
    (write `./bytes` for a file of that name); a tokenizer is returned as is."""
    if isinstance(spec, str) and spec == BYTE_TOKENIZER:
        return ByteTokenizer()
    if isinstance(spec, (str, Path)) and str(spec).lower().endswith(".json"):
        return TiktokenTokenizer(spec)
    if isinstance(spec, (str, Path)):
        return SentencePieceTokenizer(spec)
    return spec
