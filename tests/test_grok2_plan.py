"""`plan --config grok-2`: Grok-2's parameters per device on 8 devices under tensor_parallel, bf16 (as
released) and int8 (as held with --quantize int8), against a hand count; and the CLI's defaults for
Grok-2 (8,192-token caches, its own chat template)."""

import jax
import pytest

from grok import cli
from grok.model.config import PRESETS
from grok.parallel.sharding import Sharder, load_rules, mesh_of
from grok.planning import aot
from grok.planning.plan import _bytes_per_device
from grok.serving.chat import PRESET_TEMPLATES, ChatTemplate

GROK2 = PRESETS["grok-2"]
V, D, L, E = 131072, 8192, 64, 8
Q, KV, F, FR = 64 * 128, 8 * 128, 16384, 32768  # query and key/value widths, expert and dense MLP widths


def hand_count(weights: str) -> int:
    """Bytes per device, model=8: column-split matrices keep 1/8 of their outputs, row-split ones 1/8
    of their inputs; norms and the router are whole on every device; the two tables split on D."""
    tables = 2 * V * (D // 8) * 2  # bf16 either way (as released)
    norms = (4 * L + 1) * D * 2
    router = L * D * E * 2
    columns = L * (D * Q + 2 * D * KV + 2 * D * FR + 2 * E * D * F) // 8  # query, key, value, gate, up, w1, w3
    rows = L * (Q * D + FR * D + E * F * D) // 8  # attention out, dense down, w2
    if weights == "bf16":
        return tables + norms + router + 2 * (columns + rows)
    # int8: one byte per weight, and bf16 scales per output column: one row block, split like the
    # columns (query, key, value, gate, up, w1, w3), or 8 row blocks split over the devices (the rest).
    scales = 2 * L * ((Q + 2 * KV + 2 * FR + 2 * E * F) // 8 + (8 // 8) * (D + D + E * D))
    return tables + norms + router + columns + rows + scales


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_grok2_parameters_per_device_on_eight(weights):
    sharder = Sharder(load_rules("tensor_parallel"), mesh_of({"data": 1, "model": 8}, jax.devices()[:8]))
    params = aot.abstract_params(GROK2, sharder, weights)
    counted = _bytes_per_device(params, jax.tree.map(lambda leaf: leaf.sharding, params))
    assert counted == hand_count(weights)
    print(f"grok-2 on 8, {weights}: {counted / 2**30:.2f} GiB of parameters per device")


def test_grok2_defaults(monkeypatch):
    assert cli._cache_len(None, GROK2) == 8192 and cli._cache_len(None, PRESETS["grok-1"]) == 8192
    template = ChatTemplate.load(PRESET_TEMPLATES["grok-2"])
    assert template.render([("user", "Hi")]) == "Human: Hi<|separator|>\n\nAssistant:"
