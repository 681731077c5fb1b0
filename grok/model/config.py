"""Model configuration: a plain dataclass, named presets and JSON loading."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Feed-forward width as the reference computes it: 2/3 of w*D, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % 8


@dataclasses.dataclass(frozen=True)
class GrokConfig:
    """Hyper-parameters of a Grok-shaped model; field names follow the reference release.

    The fields after `sequence_len` are Grok-2's additions; their defaults are Grok-1's behaviour.
    """

    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int
    widening_factor: float
    attn_output_multiplier: float
    num_experts: int
    num_selected_experts: int
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    pad_token: int
    eos_token: int
    sequence_len: int
    rope_base: float = 10000.0  # rotary embedding's base (Grok-2: its `rope_theta`)
    attn_temperature_len: int = 0  # past this query position p, attention logits x log2(p)/log2(len); 0: off
    router_softcap: float = 0.0  # router logits -> cap * tanh(logits / cap) before the softmax; 0: off
    output_softcap: float = 0.0  # final logits -> cap * tanh(logits / cap), after output_multiplier_scale; 0: off
    residual_ffn_size: int = 0  # a dense gated-GELU MLP this wide beside the MoE (Grok-2's residual_moe); 0: none
    tie_embeddings: bool = True  # the output projection reads the input embedding table (else its own)
    release_dtype: str = "float32"  # the release's float tensors (embeddings, norms, router; Grok-2: all of them)

    def __post_init__(self) -> None:
        """Each field on its own (integer or finite number, positive), then how they fit together."""
        problems = [
            problem
            for field in dataclasses.fields(self)
            if (problem := _field_problem(field.name, field.type, getattr(self, field.name)))
        ]
        if problems:  # the checks below need numbers in range
            raise ValueError("invalid config: " + "; ".join(problems))
        width = self.widening_factor * self.emb_size
        if not math.isfinite(width) or self.ffn_size < 1:
            problems.append(
                f"widening_factor ({self.widening_factor}) x emb_size ({self.emb_size}) must give a finite "
                "feed-forward width >= 1"
            )
        if self.num_q_heads % self.num_kv_heads:
            problems.append(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not 0 < self.num_selected_experts <= self.num_experts:
            problems.append(
                f"num_selected_experts ({self.num_selected_experts}) must be in 1..num_experts ({self.num_experts})"
            )
        if self.key_size % 2:
            problems.append(f"key_size ({self.key_size}) must be even for rotary embeddings")
        for name in ("pad_token", "eos_token"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                problems.append(f"{name} ({getattr(self, name)}) must be < vocab_size ({self.vocab_size})")
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))

    @property
    def ffn_size(self) -> int:
        """Width F of each expert's hidden layer."""
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def heads_per_kv_head(self) -> int:
        """G: query heads that share one key/value head."""
        return self.num_q_heads // self.num_kv_heads

    def replace(self, **changes) -> GrokConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


RELEASE_DTYPES = ("float32", "bfloat16")
_MAY_BE_ZERO = ("pad_token", "eos_token", "attn_temperature_len", "router_softcap", "output_softcap",
                "residual_ffn_size")  # every other number must be positive


def _field_problem(name: str, kind: str | type, value: object) -> str | None:
    """What is wrong with one field's value on its own (its type, finiteness and sign), if anything."""
    if kind in ("bool", bool):
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if kind in ("str", str):
        return None if value in RELEASE_DTYPES else f"{name} must be one of {', '.join(RELEASE_DTYPES)}, got {value!r}"
    if kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an integer, got {value!r}"
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    elif not math.isfinite(value):
        return f"{name} must be finite, got {value!r}"
    if name in _MAY_BE_ZERO:
        return f"{name} must be >= 0, got {value!r}" if value < 0 else None
    return f"{name} must be > 0, got {value!r}" if value <= 0 else None


def _small(emb_size: int, key_size: int, num_q_heads: int, num_kv_heads: int, **fields) -> GrokConfig:
    """A small Grok-shaped config whose multipliers follow the released model's formulas."""
    defaults = dict(
        widening_factor=2.0,
        num_experts=8,
        num_selected_experts=2,
        pad_token=0,
        eos_token=2,
        sequence_len=256,
    )
    defaults.update(fields)
    return GrokConfig(
        emb_size=emb_size,
        key_size=key_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        attn_output_multiplier=1 / math.sqrt(key_size),
        embedding_multiplier_scale=math.sqrt(emb_size),
        output_multiplier_scale=1 / math.sqrt(3),
        **defaults,
    )


PRESETS: dict[str, GrokConfig] = {
    # The released 314B model, exactly as in GROK1.md.
    "grok-1": GrokConfig(
        emb_size=6144,
        key_size=128,
        num_q_heads=48,
        num_kv_heads=8,
        num_layers=64,
        vocab_size=128 * 1024,
        widening_factor=8,
        attn_output_multiplier=0.08838834764831845,
        num_experts=8,
        num_selected_experts=2,
        embedding_multiplier_scale=78.38367176906169,
        output_multiplier_scale=0.5773502691896257,
        pad_token=0,
        eos_token=2,
        sequence_len=8192,
    ),
    # What `python run.py` runs with random weights when no checkpoint is present (~10 MB of int8; byte-level vocabulary).
    "demo": _small(emb_size=256, key_size=32, num_q_heads=8, num_kv_heads=2, num_layers=4, vocab_size=328),
    # xAI's Grok-2 (hub repo xai-org/grok-2, config.json): 64 layers of width 8192, 64 query / 8 kv heads
    # of 128, 8 experts (top 2) of width 16384 (= ffn_size(8192, 3)) beside a dense MLP of 32768, a
    # 131,072-token context (trained at 8192), its own output table. Its `rope_type` "original" is
    # plain RoPE at rope_theta: the scaling fields only size the context (SGLang's reading).
    "grok-2": GrokConfig(
        emb_size=8192,
        key_size=128,
        num_q_heads=64,
        num_kv_heads=8,
        num_layers=64,
        vocab_size=128 * 1024,
        widening_factor=3,
        attn_output_multiplier=1 / math.sqrt(128),
        num_experts=8,
        num_selected_experts=2,
        embedding_multiplier_scale=90.50966799187809,
        output_multiplier_scale=0.5,
        pad_token=0,
        eos_token=2,
        sequence_len=128 * 1024,
        rope_base=208533496.0,
        attn_temperature_len=1024,
        router_softcap=30.0,
        output_softcap=50.0,
        residual_ffn_size=32768,
        tie_embeddings=False,
        release_dtype="bfloat16",
    ),
    # Tiny model for unit tests: 4 experts so nothing assumes 8.
    "tiny": _small(
        emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2, vocab_size=256,
        num_experts=4, sequence_len=64,
    ),
    # Tiny model whose heads, experts and widths all divide by 8: for sharding tests on 8 devices.
    "shard": _small(
        emb_size=64, key_size=8, num_q_heads=8, num_kv_heads=8, num_layers=2, vocab_size=256, sequence_len=64,
    ),
}


def load_config(spec: str | Path | GrokConfig) -> GrokConfig:
    """Return a config from a preset name, a JSON file path, or a config (returned as is)."""
    if isinstance(spec, GrokConfig):
        return spec
    name = str(spec)
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if not path.suffix == ".json" and not path.exists():
        raise ValueError(f"unknown config {name!r}: expected one of {sorted(PRESETS)} or a .json file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ValueError(f"config file {path} cannot be read: {err.strerror or err}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"config file {path} must hold a JSON object of config fields")
    return config_from_dict(fields, source=str(path))


def config_from_dict(fields: dict, source: str = "config") -> GrokConfig:
    """Build a config from a dict of the dataclass's field names: every field without a default
    (Grok-1's), any of those with one."""
    known = {f.name for f in dataclasses.fields(GrokConfig)}
    required = {f.name for f in dataclasses.fields(GrokConfig) if f.default is dataclasses.MISSING}
    unknown = sorted(set(fields) - known)
    missing = sorted(required - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown config field(s): {', '.join(unknown)}")
    if missing:
        raise ValueError(f"{source}: missing config field(s): {', '.join(missing)}")
    try:
        return GrokConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
