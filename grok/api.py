"""Python API: load a model, get logits, generate text.

    from grok import Grok
    model = Grok.from_checkpoint("checkpoints/ckpt-0", config="grok-1", tokenizer="checkpoints/tokenizer.model")
    print(model.generate("The answer is", max_new_tokens=20).text)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok import checkpoint, model, weights
from grok.config import GrokConfig, load_config
from grok.loader import load_sharded, place
from grok.sampling import sample
from grok.sharding import Sharder, load_rules, make_mesh
from grok.tokenizer import SentencePieceTokenizer, Tokenizer

CACHE_BLOCK = 128  # KV-cache lengths and prompt lengths are rounded up to this, so shapes repeat


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens: temperature 0 is greedy; top_k 0 and top_p 1 disable those limits."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # the generated continuation, without the prompt
    text: str | None  # the continuation decoded, when the model has a tokenizer
    finish_reason: str  # "eos", "length" (max_new_tokens) or "context" (sequence_len reached)


class Grok:
    """A loaded model: parameters (model tree) placed on a mesh, its config, optionally a tokenizer.

    Without a `sharder` everything lives on the first device (the `replicated` rules on a 1x1 mesh).
    """

    def __init__(
        self,
        config: GrokConfig,
        params: weights.Params,
        tokenizer: Tokenizer | None = None,
        sharder: Sharder | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.sharder = sharder or Sharder(load_rules("replicated"), make_mesh(1, 1, jax.devices()[:1]))
        shardings = self.sharder.param_shardings(weights.model_shapes(config))
        self.params = jax.tree.map(
            lambda x, s: x if isinstance(x, jax.Array) and x.sharding == s else place(np.asarray(x), s),
            params, shardings,
        )
        apply = model.build(config, constrain=self.sharder.constrain).apply
        replicated = self.sharder.replicated()
        self._logits = jax.jit(lambda p, tokens: apply(p, tokens).logits, out_shardings=replicated)
        self._prefill = jax.jit(functools.partial(_prefill, apply), out_shardings=(replicated, None))
        self._decode = jax.jit(functools.partial(_decode, apply), out_shardings=(replicated, None), donate_argnums=2)

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        config: str | Path | GrokConfig = "grok-1",
        tokenizer: str | Path | Tokenizer | None = None,
        sharder: Sharder | None = None,
        progress: bool = True,
    ) -> Grok:
        """Load a release-format checkpoint; `config` is a preset name, a JSON file or a `GrokConfig`.

        With a `sharder`, each weight goes straight to its shards (see `grok.loader`).
        """
        config = load_config(config)
        directory = checkpoint.resolve_checkpoint_dir(directory)  # fail fast, before anything slow
        if isinstance(tokenizer, (str, Path)):
            tokenizer = SentencePieceTokenizer(tokenizer)
        sharder = sharder or Sharder(load_rules("replicated"), make_mesh(1, 1, jax.devices()[:1]))
        params = load_sharded(directory, config, sharder, progress=progress)
        return cls(config, params, tokenizer, sharder)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text needs a tokenizer), checked against the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _padded(self, ids: list[int], length: int) -> jax.Array:
        """[1, length] tokens: `ids` then padding, placed as the `tokens` activation."""
        tokens = np.full((1, length), self.config.pad_token, np.int32)
        tokens[0, : len(ids)] = ids
        return self.sharder.put(tokens, "tokens")

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [T, V] logits of one full forward pass over `token_ids`."""
        ids = self.encode(token_ids)
        if not 0 < len(ids) <= self.config.sequence_len:
            raise ValueError(f"need 1..{self.config.sequence_len} token ids, got {len(ids)}")
        # Causal: trailing padding changes nothing before it, and padded lengths repeat (no recompiles).
        tokens = self._padded(ids, min(_round_up(len(ids), CACHE_BLOCK), self.config.sequence_len))
        return np.asarray(self._logits(self.params, tokens)[0, : len(ids)], np.float32)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
    ) -> Generation:
        """Continue `prompt` until EOS, `max_new_tokens`, or the context (sequence_len) is full."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.config.sequence_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context holds {self.config.sequence_len}, "
                "leaving no room to generate"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        budget = min(max_new_tokens, self.config.sequence_len - len(ids))
        cache_len = min(_round_up(len(ids) + budget, CACHE_BLOCK), self.config.sequence_len)
        tokens = self._padded(ids, min(_round_up(len(ids), CACHE_BLOCK), cache_len))
        put = self.sharder.put
        memory = model.KVMemory(
            k=self.sharder.zeros_cache(self.config, 1, cache_len),
            v=self.sharder.zeros_cache(self.config, 1, cache_len),
            mask=put(np.zeros((1, cache_len), bool), "tokens"),
            step=put(np.zeros((1, 1), np.int32), "tokens")[:, 0],
        )
        settings = Sampling(
            seed=put(np.asarray([[sampling.seed]], np.uint32), "tokens"),
            temperature=put(np.asarray([[sampling.temperature]], np.float32), "tokens"),
            top_p=put(np.asarray([[sampling.top_p]], np.float32), "tokens"),
            top_k=put(np.asarray([[sampling.top_k]], np.int32), "tokens"),
        )
        length = put(np.asarray([[len(ids)]], np.int32), "tokens")
        token, memory = self._prefill(self.params, tokens, memory, length, settings)
        tokens_out: list[int] = []
        finish = "context" if budget < max_new_tokens else "length"
        while True:
            tokens_out.append(int(np.asarray(token)[0]))
            if tokens_out[-1] == self.config.eos_token:
                finish = "eos"
                break
            if len(tokens_out) == budget:
                break
            token, memory = self._decode(self.params, put(np.asarray(token)[:, None], "tokens"), memory, settings)
        text = self.tokenizer.decode(tokens_out) if self.tokenizer is not None else None
        return Generation(prompt_ids=ids, token_ids=tokens_out, text=text, finish_reason=finish)


class Sampling(NamedTuple):
    """Per-row sampling settings as [B, 1] device arrays (laid out like tokens)."""

    seed: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array


def _next_token(logits: jax.Array, positions: jax.Array, settings: Sampling) -> jax.Array:
    """Sample each row's next token; the key depends only on the row's seed and position."""
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(settings.seed[:, 0], positions)
    return sample(logits, keys, settings.temperature[:, 0], settings.top_p[:, 0], settings.top_k[:, 0])


def _prefill(apply, params, tokens, memory, lengths, settings):
    """Run the right-padded prompts; sample the first new token of each row."""
    out = apply(params, tokens, memory, lengths[:, 0])
    last = jnp.take_along_axis(out.logits, lengths[:, :, None] - 1, axis=1)[:, 0]
    return _next_token(last, out.memory.step, settings), out.memory


def _decode(apply, params, token, memory, settings):
    """Feed one token per row; sample the next."""
    out = apply(params, token, memory)
    return _next_token(out.logits[:, -1], out.memory.step, settings), out.memory


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
