"""Text <-> token ids: the released SentencePiece model, or a byte-level stand-in for the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import sentencepiece


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
    """A tokenizer: the string "bytes" is `ByteTokenizer`, any other string or a path a SentencePiece model
    file (write `./bytes` for a file of that name); a tokenizer is returned as is."""
    if isinstance(spec, str) and spec == BYTE_TOKENIZER:
        return ByteTokenizer()
    if isinstance(spec, (str, Path)):
        return SentencePieceTokenizer(spec)
    return spec
