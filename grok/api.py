"""Python API: load a model, get logits, generate text.

    from grok import Grok
    model = Grok.from_checkpoint("checkpoints/ckpt-0", config="grok-1", tokenizer="checkpoints/tokenizer.model")
    print(model.generate("The answer is", max_new_tokens=20).text)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok import checkpoint, model, weights
from grok.config import GrokConfig, load_config
from grok.sampling import sample
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
    """A loaded model: parameters (model tree), its config and optionally a tokenizer."""

    def __init__(self, config: GrokConfig, params: weights.Params, tokenizer: Tokenizer | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        transformed = model.build(config)
        self._forward = jax.jit(transformed.apply)
        self._step = jax.jit(functools.partial(_decode_step, transformed.apply), donate_argnums=(2,))
        self._sample = jax.jit(sample)

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        config: str | Path | GrokConfig = "grok-1",
        tokenizer: str | Path | Tokenizer | None = None,
        progress: bool = True,
    ) -> Grok:
        """Load a release-format checkpoint; `config` is a preset name, a JSON file or a `GrokConfig`."""
        config = load_config(config)
        directory = checkpoint.resolve_checkpoint_dir(directory)  # fail fast, before anything slow
        if isinstance(tokenizer, (str, Path)):
            tokenizer = SentencePieceTokenizer(tokenizer)
        tree = checkpoint.read_checkpoint(directory, config, progress=progress)
        params = jax.device_put(weights.stack_layers(tree, config.num_layers))
        return cls(config, params, tokenizer)

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

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [T, V] logits of one full forward pass over `token_ids`."""
        ids = self.encode(token_ids)
        if not 0 < len(ids) <= self.config.sequence_len:
            raise ValueError(f"need 1..{self.config.sequence_len} token ids, got {len(ids)}")
        padded = np.full((1, min(_round_up(len(ids), CACHE_BLOCK), self.config.sequence_len)), self.config.pad_token)
        padded[0, : len(ids)] = ids  # causal: trailing padding changes nothing before it, and shapes repeat
        out = self._forward(self.params, jnp.asarray(padded, jnp.int32))
        return np.asarray(out.logits[0, : len(ids)].astype(jnp.float32))

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
        padded = np.full((1, min(_round_up(len(ids), CACHE_BLOCK), cache_len)), self.config.pad_token, np.int32)
        padded[0, : len(ids)] = ids

        memory = model.init_memory(self.config, 1, cache_len)
        out = self._forward(self.params, jnp.asarray(padded), memory, jnp.asarray([len(ids)], jnp.int32))
        logits, memory = out.logits[:, len(ids) - 1], out.memory
        key = jax.random.key(sampling.seed)
        settings = (
            jnp.asarray([sampling.temperature], jnp.float32),
            jnp.asarray([sampling.top_p], jnp.float32),
            jnp.asarray([sampling.top_k], jnp.int32),
        )
        tokens: list[int] = []
        finish = "context" if budget < max_new_tokens else "length"
        for _ in range(budget):
            key, draw = jax.random.split(key)
            token = self._sample(logits, draw[None], *settings)
            tokens.append(int(token[0]))
            if tokens[-1] == self.config.eos_token:
                finish = "eos"
                break
            if len(tokens) < budget:
                logits, memory = self._step(self.params, token, memory)
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return Generation(prompt_ids=ids, token_ids=tokens, text=text, finish_reason=finish)


def _decode_step(apply, params, token, memory):
    """Feed one token per row; return the next logits and the updated cache."""
    out = apply(params, token[:, None], memory)
    return out.logits[:, -1], out.memory


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
