"""How close an accelerator's decode step comes to its memory roofline.

A decode step at serving batch sizes is bound by memory bandwidth: each step has to read the weights
it uses (int8 and their scales), the whole KV cache of its fixed-shape program and the output table.
Those are its ideal bytes (`ideal_decode_bytes`). What the compiled step really moves
(`grok.planning.traffic.count_traffic`) over that is its ratio; moved bytes over the device's
published bandwidth is a lower bound on its step time, and so an upper bound on its speed.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from grok.model.config import GrokConfig
from grok.planning.traffic import Traffic

MIB = 1 << 20
LARGE_WRITE = 16 * MIB  # an intermediate this large in a decode step is a copy of a weight, or worse
_EXPERT_WEIGHTS = ("moe/linear/", "moe/linear_v/", "moe/linear_1/")
_TABLE = "in_out_embed/embeddings"


def ideal_decode_bytes(
    config: GrokConfig, params, kv_caches, batch: int
) -> dict[str, int]:
    """Bytes one device must read in a decode step of `batch` rows, by kind: "weights" and "scales"
    (the 8-bit weights' two parts; float parameters count as weights), "kv" and "table".

    `params` and `kv_caches` are ShapeDtypeStructs with shardings (the decode step's arguments).
    Expert weights count only the experts a step can select on the device: min(experts there,
    batch x selected experts); every other parameter counts whole.
    """
    ideal = dict.fromkeys(("weights", "scales", "kv", "table"), 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
        if any(part in name for part in _EXPERT_WEIGHTS):
            local = shard[-3]  # [layers, experts, in or blocks, out]
            nbytes = nbytes * min(local, batch * config.num_selected_experts) // local
        kind = "table" if _TABLE in name else "scales" if name.endswith("scales") else "weights"
        ideal[kind] += nbytes
    for cache in jax.tree.leaves(kv_caches):
        ideal["kv"] += int(np.prod(cache.sharding.shard_shape(cache.shape))) * np.dtype(cache.dtype).itemsize
    return ideal


@dataclasses.dataclass
class DecodeRoofline:
    """One device's decode step against its ideal bytes, on a target of `bandwidth` bytes/s."""

    batch: int
    bandwidth: float
    moved_bytes: int
    read_bytes: int
    write_bytes: int
    ideal: dict[str, int]
    largest_writes: list[str]  # outputs of LARGE_WRITE bytes or more (in-place updates count their update)
    unknown_loops: list[str]  # while loops without a known trip count (counted once)

    @classmethod
    def of(cls, traffic: Traffic, ideal: dict[str, int], batch: int, bandwidth: float) -> DecodeRoofline:
        large = [
            f"{w.opcode} {w.instruction} {w.type.split('{')[0]} ({w.bytes / MIB:.0f} MiB x {w.runs}): {w.op_name}"
            for w in traffic.largest_writes(LARGE_WRITE)
        ]
        return cls(batch, bandwidth, traffic.bytes, traffic.read_bytes, traffic.write_bytes, ideal, large,
                   traffic.unknown_trip_counts)

    @property
    def ideal_bytes(self) -> int:
        return sum(self.ideal.values())

    @property
    def ratio(self) -> float:
        return self.moved_bytes / self.ideal_bytes

    @property
    def tokens_per_s(self) -> float:
        """Tokens a second over all rows if the step ran at the bandwidth (nothing else limits it)."""
        return self.batch * self.bandwidth / self.moved_bytes

    @property
    def roofline_tokens_per_s(self) -> float:
        return self.batch * self.bandwidth / self.ideal_bytes

    def to_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.update(ideal_bytes=self.ideal_bytes, ratio=self.ratio, tokens_per_s=self.tokens_per_s,
                      roofline_tokens_per_s=self.roofline_tokens_per_s)
        return fields

    def describe(self) -> list[str]:
        gib = lambda n: f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / MIB:.1f} MiB"
        parts = ", ".join(f"{kind} {gib(n)}" for kind, n in self.ideal.items())
        lines = [
            f"Decode step, batch {self.batch}, per device (from the optimized HLO):",
            f"  moved        {gib(self.moved_bytes)}   (read {gib(self.read_bytes)}, written {gib(self.write_bytes)})",
            f"  ideal        {gib(self.ideal_bytes)}   ({parts})",
            f"  ratio        {self.ratio:.2f}x",
            f"  projected    {self.tokens_per_s:.0f} tokens/s at {self.bandwidth / 1e12:.2f} TB/s "
            f"(roofline {self.roofline_tokens_per_s:.0f}; no overlap, caches or autotuning counted)",
        ]
        if self.largest_writes:
            lines.append(f"  writes of {LARGE_WRITE // MIB} MiB or more:")
            lines += [f"    {w}" for w in self.largest_writes[:8]]
        if self.unknown_loops:
            lines.append(f"  loops counted once (no trip count found): {', '.join(self.unknown_loops)}")
        return lines
