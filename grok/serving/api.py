"""Python API: load a model, get logits, generate text.

    from grok import Grok
    model = Grok.from_checkpoint("checkpoints/ckpt-0", config="grok-1", tokenizer="checkpoints/tokenizer.model")
    print(model.generate("The answer is", max_new_tokens=20).text)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from grok.checkpoint.files import resolve_checkpoint_dir
from grok.checkpoint.loader import load_layers, load_sharded, place
from grok.model import transformer, weights
from grok.model.config import GrokConfig, load_config
from grok.parallel.sharding import Sharder, single_device
from grok.serving import pod as pods
from grok.serving.engine import Engine, Generation, Request
from grok.serving.executor import Mirror, issue
from grok.serving.sampling import SamplingParams
from grok.serving.tokenizer import Tokenizer, load_tokenizer

CACHE_BLOCK = 128  # `logits` pads sequences to a multiple of this, so few shapes are compiled
MAX_GENERATE_BATCH = 8  # `generate` runs at most this many prompts at once


def _one_cpu_device(sharder: Sharder) -> bool:
    """Whether the mesh is a single CPU device: the CPU weight formats' layout."""
    devices = sharder.mesh.devices
    return devices.size == 1 and devices.flat[0].platform == "cpu"


class Grok:
    """A loaded model: parameters (model tree) placed on a mesh, its config, optionally a tokenizer.

    Without a `sharder` everything lives on the first device (the `replicated` rules on a 1x1 mesh).
    On one CPU device the weights are held in the int8 CPU format (`grok.model.transformer.cpu_int8_params`:
    the released 8-bit weights as loaded, read by native kernels, the embedding table in bf16;
    unrolled layers). `cpu_format=True` holds them in the f32 CPU format instead
    (`grok.model.transformer.f32_params`: every 8-bit weight dequantized once to float32, 4x its memory), kept
    for comparison. Elsewhere the weights stay as released, in the scanned layers' stacked tree
    (on an accelerator with the embedding table in bf16, `grok.model.transformer.held_params`).
    All formats give the same numbers.

    On a pod of several processes (`grok.serving.pod`), every process loads the model; process 0
    (the leader) then calls `generate`, `logits` and `close`, and every other process calls
    `follow`, which runs the leader's device calls until `close`.
    """

    def __init__(
        self,
        config: GrokConfig,
        params: weights.Params,
        tokenizer: Tokenizer | None = None,
        sharder: Sharder | None = None,
        cpu_format: bool | None = None,
        pod: pods.Pod | None = None,
    ):
        self.config = config
        self.pod = pod
        self.tokenizer = tokenizer
        self.sharder = sharder or single_device()
        one_cpu = _one_cpu_device(self.sharder)
        if cpu_format and not one_cpu:
            raise ValueError("cpu_format needs a single CPU device: the f32 CPU format is not sharded")
        self.scan_layers = not one_cpu
        if one_cpu:  # per-layer weights (a stacked tree is split first), converted one by one onto the device
            convert = transformer.f32_params if cpu_format else transformer.cpu_int8_params
            with jax.default_device(self.sharder.mesh.devices.flat[0]):
                self.params = convert(weights.unstack_layers(params, config.num_layers))
        else:
            # The scales' layout depends on their row blocks: those of `params`, not the release's.
            shapes = jax.tree.map(
                weights.as_stored, weights.model_shapes(config), params, is_leaf=weights.is_weight
            )
            self.params = transformer.held_params(jax.tree.map(
                lambda x, s: x if isinstance(x, jax.Array) and x.sharding == s else place(np.asarray(x), s),
                params, self.sharder.param_shardings(shapes),
            ))
        self.apply = transformer.build(config, constrain=self.sharder.constrain, scan_layers=self.scan_layers).apply
        self._logits = jax.jit(lambda p, tokens: self.apply(p, tokens).logits, out_shardings=self.sharder.replicated())
        self._engine: Engine | None = None  # made on the first `generate`

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        config: str | Path | GrokConfig = "grok-1",
        tokenizer: str | Path | Tokenizer | None = None,
        sharder: Sharder | None = None,
        progress: bool = True,
        cpu_format: bool | None = None,
        heartbeat_timeout_s: float = pods.HEARTBEAT_TIMEOUT_S,
        quantize: bool = False,
    ) -> Grok:
        """Load a release-format checkpoint; `config` is a preset name, a JSON file or a `GrokConfig`;
        `tokenizer` a SentencePiece model file, "bytes" (the demo's `ByteTokenizer`) or a tokenizer.

        With a `sharder`, each weight goes straight to its shards (see `grok.checkpoint.loader`). On one CPU
        device each is converted to the CPU format as it is read (`grok.checkpoint.loader.load_layers`), so
        loading holds at most one tensor file more than the loaded model.

        `quantize`: hold Grok-2's bf16 release as int8 with per-column scales (about half its bytes;
        Grok-1's checkpoints are 8-bit already).

        On several processes, they first join as a pod (`grok.serving.pod.join`), which checks that
        each loads the same config, rules, mesh and checkpoint; a follower silent for
        `heartbeat_timeout_s` is lost (as is the leader, to its followers).
        """
        config = load_config(config)
        directory = resolve_checkpoint_dir(directory)  # fail fast, before anything slow
        if tokenizer is not None:
            tokenizer = load_tokenizer(tokenizer)
        sharder = sharder or single_device()
        sharder.check_activations(config)
        pod = pods.join(pods.fingerprint(config, sharder, directory, quantize), heartbeat_timeout_s)
        if _one_cpu_device(sharder):
            leaf = transformer.f32_leaf if cpu_format else transformer.cpu_int8_leaf
            with jax.default_device(sharder.mesh.devices.flat[0]):
                params = load_layers(directory, config, convert=leaf, progress=progress, quantize=quantize)
        else:
            params = load_sharded(directory, config, sharder, progress=progress, quantize=quantize)
        return cls(config, params, tokenizer, sharder, cpu_format, pod)

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
        # Causal: trailing padding changes nothing before it, and padded lengths repeat (no recompiles).
        tokens = np.full((1, min(_round_up(len(ids), CACHE_BLOCK), self.config.sequence_len)), self.config.pad_token)
        tokens[0, : len(ids)] = ids
        tokens = tokens.astype(np.int32)
        logits = issue(self._send, {"op": "logits", "tokens": tokens}, lambda: self._run_logits(tokens))
        return np.asarray(logits[0, : len(ids)], np.float32)

    def _run_logits(self, tokens: np.ndarray) -> jax.Array:
        return self._logits(self.params, self.sharder.put(tokens, "tokens"))

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
    ) -> Generation | list[Generation]:
        """Continue a prompt (text or token ids) until EOS, `max_new_tokens`, or the context
        (sequence_len) is full. Given a list of prompts, generate them together (up to
        MAX_GENERATE_BATCH at once) and return their generations in order.

        For a stream of requests, use `grok.serving.engine.Engine` (continuous batching).
        """
        several = not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer))
        prompts = list(prompt) if several else [prompt]
        rows = min(len(prompts), MAX_GENERATE_BATCH)
        if self._engine is None or self._engine.max_batch < rows:
            self._engine = None  # its caches go first
            self._engine = Engine(self, max_batch=rows)
        results = self._engine.generate([Request(p, max_new_tokens, sampling) for p in prompts])
        return results if several else results[0]

    @property
    def _send(self):
        return self.pod.send if self.pod is not None and self.pod.leader else None

    def follow(self) -> None:
        """(A pod's follower) run the leader's device calls until the leader calls `close`."""
        if self.pod is None or self.pod.leader:
            raise RuntimeError("follow() is for a pod's followers: processes 1 and up of several")
        self.pod.follow(Mirror(self, {"logits": lambda message: self._run_logits(message["tokens"])}))

    def close(self) -> None:
        """(A pod's leader) tell the followers to stop: their `follow` returns. Nothing on one process."""
        if self.pod is not None and self.pod.leader:
            self.pod.stop()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
