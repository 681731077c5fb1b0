"""The HLO traffic counter (grok/planning/traffic.py) on hand-written optimized HLO, whose bytes are
counted here by hand: no compiler needed."""

from grok.planning.traffic import count_traffic, parse_module, type_bytes

MIB = 1 << 20

# A scan of 4 layers over a stacked s8[4,1024,1024] weight (1 MiB a layer): the body's fusion reads
# its layer through a dynamic-slice, and updates a f32[4,8,256] cache in place; a conditional picks
# one of two branches; one buffer lives in on-chip memory (S(1)).
MODULE = """
HloModule jit_step, entry_computation_layout={(s8[4,1024,1024]{2,1,0}, f32[8,1024]{1,0})->f32[8,1024]{1,0}}

%fused_layer (param_0.1: s8[4,1024,1024], param_1.1: s32[], param_2.1: f32[8,1024]) -> f32[8,1024] {
  %param_0.1 = s8[4,1024,1024]{2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  %dynamic-slice.1 = s8[1,1024,1024]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant.1, %constant.1), dynamic_slice_sizes={1,1024,1024}
  %bitcast.1 = s8[1024,1024]{1,0} bitcast(%dynamic-slice.1)
  %convert.1 = f32[1024,1024]{1,0} convert(%bitcast.1)
  %param_2.1 = f32[8,1024]{1,0} parameter(2)
  ROOT %dot.1 = f32[8,1024]{1,0} dot(%param_2.1, %convert.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (param_0.2: f32[4,8,256], param_1.2: f32[1,8,256], param_2.2: s32[]) -> f32[4,8,256] {
  %param_0.2 = f32[4,8,256]{2,1,0} parameter(0)
  %param_1.2 = f32[1,8,256]{2,1,0} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %constant.2 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[4,8,256]{2,1,0} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %constant.2, %constant.2)
}

%body (param.1: (s32[], s8[4,1024,1024], f32[8,1024], f32[4,8,256])) -> (s32[], s8[4,1024,1024], f32[8,1024], f32[4,8,256]) {
  %param.1 = (s32[], s8[4,1024,1024]{2,1,0}, f32[8,1024]{1,0}, f32[4,8,256]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param.1), index=0
  %w = s8[4,1024,1024]{2,1,0} get-tuple-element(%param.1), index=1
  %h = f32[8,1024]{1,0} get-tuple-element(%param.1), index=2
  %cache = f32[4,8,256]{2,1,0} get-tuple-element(%param.1), index=3
  %layer = f32[8,1024]{1,0} fusion(%w, %i, %h), kind=kOutput, calls=%fused_layer
  %slice.1 = f32[8,256]{1,0} slice(%layer), slice={[0:8], [0:256]}
  %bitcast.2 = f32[1,8,256]{2,1,0} bitcast(%slice.1)
  %updated = f32[4,8,256]{2,1,0} fusion(%cache, %bitcast.2, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %tuple.1 = (s32[], s8[4,1024,1024]{2,1,0}, f32[8,1024]{1,0}, f32[4,8,256]{2,1,0}) tuple(%next, %w, %layer, %updated)
}

%cond (param.2: (s32[], s8[4,1024,1024], f32[8,1024], f32[4,8,256])) -> pred[] {
  %param.2 = (s32[], s8[4,1024,1024]{2,1,0}, f32[8,1024]{1,0}, f32[4,8,256]{2,1,0}) parameter(0)
  %j = s32[] get-tuple-element(%param.2), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%j, %four), direction=LT
}

%small (p.3: f32[8,1024]) -> f32[8,1024] {
  %p.3 = f32[8,1024]{1,0} parameter(0)
  ROOT %negate.1 = f32[8,1024]{1,0} negate(%p.3)
}

%large (p.4: f32[8,1024]) -> f32[8,1024] {
  %p.4 = f32[8,1024]{1,0} parameter(0)
  %copy.1 = f32[8,1024]{1,0} copy(%p.4)
  ROOT %negate.2 = f32[8,1024]{1,0} negate(%copy.1)
}

ENTRY %main (w.1: s8[4,1024,1024], x.1: f32[8,1024]) -> f32[8,1024] {
  %w.1 = s8[4,1024,1024]{2,1,0} parameter(0)
  %x.1 = f32[8,1024]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %cache.0 = f32[4,8,256]{2,1,0} broadcast(%zero), dimensions={}
  %init = (s32[], s8[4,1024,1024]{2,1,0}, f32[8,1024]{1,0}, f32[4,8,256]{2,1,0}) tuple(%zero, %w.1, %x.1, %cache.0)
  %loop = (s32[], s8[4,1024,1024]{2,1,0}, f32[8,1024]{1,0}, f32[4,8,256]{2,1,0}) while(%init), condition=%cond, body=%body
  %out = f32[8,1024]{1,0} get-tuple-element(%loop), index=2
  %on_chip = f32[8,1024]{1,0:S(1)} copy(%out)
  %pick = s32[] constant(1)
  ROOT %branch = f32[8,1024]{1,0} conditional(%pick, %on_chip, %on_chip), branch_computations={%small, %large}
}
"""

KIB32 = 8 * 1024 * 4  # an f32[8,1024]


def test_hand_counted_module():
    traffic = count_traffic(MODULE)
    cache = 4 * 8 * 256 * 4
    update = 8 * 256 * 4
    per_layer = (
        MIB + 4 + KIB32 + KIB32  # layer fusion: its weight slice, the index, h; writes the new h
        + 2 * KIB32 // 4  # the slice: reads and writes f32[8,256]
        + update + 4 + update  # the in-place update: reads the update and the index, writes the update
        + 4 + 4 + 4  # the counter's add (two s32 operands, one s32 result)
    )
    loop_condition = 4 + 4 + 1  # per iteration: compare (two s32) -> pred
    entry = (
        4 + cache  # the cache's broadcast of a scalar
        + KIB32  # the copy into on-chip memory: reads device memory, writes nothing there
        + 4 * KIB32  # the larger branch: copy (read + write) and negate (read from device memory + write)
    )
    assert traffic.bytes == 4 * (per_layer + loop_condition) + entry
    assert traffic.unknown_trip_counts == []
    writes = {w.instruction: (w.bytes, w.runs) for w in traffic.writes}
    assert writes["cache.0"] == (cache, 1) and writes["updated"] == (update, 4) and "on_chip" not in writes
    assert [w.instruction for w in traffic.largest_writes(cache + 1)] == []


def test_a_known_trip_count_wins_over_the_condition():
    counted = count_traffic(MODULE.replace("condition=%cond, body=%body", 'condition=%cond, body=%body, '
                                           'backend_config={"known_trip_count":{"n":"2"}}'))
    assert counted.bytes < count_traffic(MODULE).bytes


def test_a_loop_without_a_bound_is_counted_once_and_named():
    traffic = count_traffic(MODULE.replace("compare(%j, %four)", "compare(%j, %j)"))
    assert traffic.unknown_trip_counts == ["loop"]


def test_a_weight_read_whole_counts_whole():
    """Without the dynamic-slice (a convert of the whole stack), each layer reads all four layers."""
    whole = MODULE.replace(
        "%dynamic-slice.1 = s8[1,1024,1024]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant.1, "
        "%constant.1), dynamic_slice_sizes={1,1024,1024}",
        "%dynamic-slice.1 = s8[1,1024,1024]{2,1,0} fusion(%param_0.1), kind=kLoop, calls=%small",
    )
    assert count_traffic(whole).bytes - count_traffic(MODULE).bytes == 4 * 3 * MIB


def test_types():
    assert type_bytes("(s32[], bf16[2,3]{1,0}, /*index=2*/f32[4]{0:T(128)S(1)})") == 4 + 12
    assert type_bytes("f32[4]{0:T(128)S(1)}", device_memory_only=False) == 16
    assert type_bytes("s4[10]") == 5
    computations, entry = parse_module(MODULE)
    assert entry == "main" and computations["body"].root.opcode == "tuple"
