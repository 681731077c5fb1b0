"""Bytes a compiled program moves through device memory, counted from its optimized HLO text.

An accelerator's decode step is bound by memory bandwidth, so the bytes its kernels read and write
per step, set beside the bytes it must read (the weights it uses, the KV cache, the table), say how
far it is from its roofline. The count walks the program as the compiler left it (after fusion,
SPMD partitioning and, on TPU, memory-space assignment), from its entry computation:
- a kernel (a fusion, a custom call, a collective, an unfused op) moves its operands and outputs;
- a fusion parameter read only through slices moves just the slices, and an output written by an
  in-place `dynamic-update-slice` moves just the update;
- views (bitcasts, tuples, their elements, parameters, constants) move nothing;
- a `while` body counts once per iteration (its `known_trip_count`, or the bound its condition
  compares with), a `conditional` as its most expensive branch;
- buffers in another memory space than device memory (a TPU's on-chip `S(n)` layouts) do not count.
What it cannot know: caches (an L2 hit is counted as a read of device memory), how kernels
overlap, and autotuning, which a deviceless compile does not run.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

# Bytes per element of each HLO element type (4-bit types count half a byte).
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1,
}
# Opcodes that move no data: views, bookkeeping, and the second halves of async pairs.
VIEWS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
    "opt-barrier", "add-dependency", "domain", "copy-done", "all-reduce-done", "all-gather-done",
    "collective-permute-done", "send-done", "recv-done", "async-done", "async-update", "get-dimension-size",
}
SLICES = {"dynamic-slice", "slice", "gather"}
# Ops that update their first operand in place (after buffer assignment): opcode -> the update's operand.
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class Instruction:
    name: str
    type: str  # the result type as printed, layouts included
    opcode: str
    operands: list[str]  # names of the instructions it reads
    arguments: str  # the text between its parentheses (a parameter's number, a constant's value)
    attributes: str  # everything after the operand list
    root: bool = False

    def called(self, kind: str) -> str | None:
        return next((name for key, name in _CALLED.findall(self.attributes) if key == kind), None)

    @property
    def op_name(self) -> str:
        found = _OP_NAME.search(self.attributes)
        return found.group(1) if found else ""


@dataclasses.dataclass
class Computation:
    name: str
    instructions: dict[str, Instruction]  # in program order

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions.values() if i.root)

    def users(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions.values() if name in i.operands]


@dataclasses.dataclass(frozen=True)
class Write:
    """One kernel's output written to device memory, as many times as it runs per program run."""

    computation: str
    instruction: str
    opcode: str
    type: str
    bytes: int
    runs: int
    op_name: str


@dataclasses.dataclass
class Traffic:
    """Device-memory bytes of one run of a program; `writes` lists every kernel output."""

    read_bytes: int
    write_bytes: int
    writes: list[Write]
    kernels: dict[str, int]  # bytes moved per kernel (instruction name), all runs counted
    unknown_trip_counts: list[str]  # while loops counted once: no trip count found

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def largest_writes(self, minimum: int) -> list[Write]:
        """Outputs of at least `minimum` bytes, largest first."""
        return sorted((w for w in self.writes if w.bytes >= minimum), key=lambda w: -w.bytes)


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module's text, and the name of its entry computation."""
    computations: dict[str, Computation] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = Computation(header.group(2), {})
            computations[current.name] = current
            if header.group(1):
                entry = current.name
            continue
        if current is None or line.strip() in ("", "}"):
            continue
        match = _INSTRUCTION.match(line)
        if match:
            instruction = _instruction(match.group(2), match.group(3), bool(match.group(1)))
            current.instructions[instruction.name] = instruction
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _instruction(name: str, rest: str, root: bool) -> Instruction:
    type_text, rest = _split_type(rest)
    opcode, _, rest = rest.partition("(")
    operands, attributes = _split_operands(rest)
    names = re.findall(r"%([\w.\-]+)", operands)
    return Instruction(name, type_text, opcode.strip(), names, operands, attributes, root)


def _split_type(text: str) -> tuple[str, str]:
    """(the result type, the rest): a tuple type runs to its matching parenthesis."""
    if not text.startswith("("):
        type_text, _, rest = text.partition(" ")
        return type_text, rest
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[: i + 1], text[i + 1 :].lstrip()
    raise ValueError(f"unbalanced tuple type: {text[:80]}")


def _split_operands(text: str) -> tuple[str, str]:
    depth = 1
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[:i], text[i + 1 :]
    return text, ""


def type_bytes(type_text: str, device_memory_only: bool = True) -> int:
    """Bytes of every array in a (possibly tuple) type; arrays laid out in a memory space other than
    0 (`S(n)` in the layout: on-chip memory) count 0 when `device_memory_only`."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if device_memory_only and layout and re.search(r"S\(([1-9]\d*)\)", layout):
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * DTYPE_BYTES.get(dtype, 4)
    return int(total)


def _tuple_elements(type_text: str) -> list[str]:
    """The element types of a tuple type (one element for an array type)."""
    if not type_text.startswith("("):
        return [type_text]
    inner = re.sub(r"/\*[^*]*\*/", "", type_text[1:-1])
    elements, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            elements.append(inner[start:i].strip())
            start = i + 1
    elements.append(inner[start:].strip())
    return [e for e in elements if e]


def count_traffic(text: str) -> Traffic:
    """The device-memory traffic of one run of the program whose optimized HLO is `text`."""
    computations, entry = parse_module(text)
    counter = _Counter(computations)
    counter.computation(entry, 1)
    return Traffic(counter.read, counter.write, counter.writes, counter.kernels, counter.unknown)


class _Counter:
    def __init__(self, computations: dict[str, Computation]) -> None:
        self.computations = computations
        self.read = self.write = 0
        self.writes: list[Write] = []
        self.kernels: dict[str, int] = {}
        self.unknown: list[str] = []

    def computation(self, name: str, runs: int) -> None:
        comp = self.computations[name]
        for instruction in comp.instructions.values():
            self.instruction(comp, instruction, runs)

    def instruction(self, comp: Computation, ins: Instruction, runs: int) -> None:
        op = ins.opcode
        if op in VIEWS:
            return
        if op == "while":
            trips = self.trip_count(ins)
            self.computation(ins.called("body"), runs * trips)
            self.computation(ins.called("condition"), runs * trips)
            return
        if op == "conditional":
            self.most_expensive_branch(ins, runs)
            return
        if op in ("call", "async-start"):
            self.computation(ins.called("calls") or ins.called("to_apply"), runs)
            return
        reads, writes = self.kernel(comp, ins)
        self.read += reads * runs
        self.write += sum(writes) * runs
        self.kernels[ins.name] = self.kernels.get(ins.name, 0) + (reads + sum(writes)) * runs
        for element, nbytes in zip(_tuple_elements(ins.type), writes):
            if nbytes:
                self.writes.append(Write(comp.name, ins.name, op, element, nbytes, runs, ins.op_name))

    def kernel(self, comp: Computation, ins: Instruction) -> tuple[int, list[int]]:
        """(bytes read, bytes written per output element) of one run of a kernel."""
        operand_types = [comp.instructions[o].type if o in comp.instructions else "" for o in ins.operands]
        outputs = [type_bytes(t) for t in _tuple_elements(ins.type)]
        if ins.opcode == "fusion":
            return self.fusion(ins, operand_types, outputs)
        if ins.opcode in SLICES:  # reads the part it copies (and its indices)
            return sum(outputs) + sum(map(type_bytes, operand_types[1:])), outputs
        if ins.opcode in IN_PLACE:  # the update is read and written, the rest stays where it is
            update = type_bytes(operand_types[IN_PLACE[ins.opcode]])
            return update + sum(map(type_bytes, operand_types[1 : IN_PLACE[ins.opcode]])), [update]
        if ins.opcode == "copy-start":  # (destination, source, context): a copy, often to on-chip memory
            return sum(map(type_bytes, operand_types)), outputs[:1]
        if ins.opcode.endswith("-start"):  # async collectives: the result echoes the operands, then the outputs
            echoed = len(ins.operands) if len(outputs) > len(ins.operands) else 0
            return sum(map(type_bytes, operand_types)), outputs[echoed:] or outputs[:1]
        return sum(map(type_bytes, operand_types)), outputs

    def fusion(self, ins: Instruction, operand_types: list[str], outputs: list[int]) -> tuple[int, list[int]]:
        fused = self.computations[ins.called("calls")]
        params = {int(i.arguments): i for i in _parameters(fused)}
        in_place = {}  # output element -> bytes of its in-place update
        root = fused.root
        elements = [fused.instructions[o] for o in root.operands] if root.opcode == "tuple" else [root]
        updated_params = set()
        for index, element in enumerate(elements):
            element = _through_bitcasts(fused, element)
            if element.opcode in IN_PLACE:
                target = _through_bitcasts(fused, fused.instructions[element.operands[0]])
                if target.opcode == "parameter":
                    updated_params.add(target.name)
                    update = fused.instructions[element.operands[IN_PLACE[element.opcode]]]
                    in_place[index] = type_bytes(update.type, device_memory_only=False)
        reads = 0
        for index, operand_type in enumerate(operand_types):
            param = params.get(index)
            if param is None or not type_bytes(operand_type) or param.name in updated_params:
                continue
            sliced = _sliced_elements(self.computations, fused, param.name)
            full = _elements(param.type)
            if sliced is not None and full and sliced < full:
                reads += type_bytes(operand_type) * sliced // full
            else:
                reads += type_bytes(operand_type)
        writes = [in_place.get(i, nbytes) if nbytes else 0 for i, nbytes in enumerate(outputs)]
        return reads, writes

    def trip_count(self, ins: Instruction) -> int:
        known = _TRIP_COUNT.search(ins.attributes)
        if known:
            return int(known.group(1))
        bound = _loop_bound(self.computations, ins.called("condition"))
        if bound is None:
            self.unknown.append(ins.name)
            return 1
        return bound

    def most_expensive_branch(self, ins: Instruction, runs: int) -> None:
        found = _BRANCHES.search(ins.attributes)
        branches = re.findall(r"%?([\w.\-]+)", found.group(1)) if found else [
            ins.called("true_computation"), ins.called("false_computation")]
        best = None
        for branch in branches:
            trial = _Counter(self.computations)
            trial.computation(branch, runs)
            if best is None or trial.read + trial.write > best.read + best.write:
                best = trial
        if best is not None:
            self.read += best.read
            self.write += best.write
            self.writes += best.writes
            self.unknown += best.unknown
            for name, nbytes in best.kernels.items():
                self.kernels[name] = self.kernels.get(name, 0) + nbytes


def _elements(type_text: str) -> int:
    """Elements of an array type."""
    found = _ARRAY.search(type_text)
    count = 1
    for dim in filter(None, found.group(2).split(",")) if found else ():
        count *= int(dim)
    return count


def _sliced_elements(computations: dict[str, Computation], comp: Computation, name: str) -> int | None:
    """Elements of `name` that the fused computation reads, when it reads it only through slices
    (directly, after bitcasts, converts and layout copies that keep its size, or inside nested
    fusions); None when something reads it whole."""
    users = comp.users(name)
    if not users:
        return None
    total, size = 0, _elements(comp.instructions[name].type)
    for user in users:
        if user.opcode in SLICES and user.operands[0] == name:
            total += _elements(user.type)
            continue
        inner = None
        elementwise = user.opcode in ("bitcast", "copy", "convert", "fusion") and len(user.operands) == 1
        if elementwise and _elements(user.type) == size:  # the same elements, another type or layout
            inner = _sliced_elements(computations, comp, user.name)
        elif user.opcode == "fusion" and user.operands.count(name) == 1:
            nested = computations[user.called("calls")]
            index = user.operands.index(name)
            param = next((p for p in _parameters(nested) if p.arguments == str(index)), None)
            inner = None if param is None else _sliced_elements(computations, nested, param.name)
        if inner is None:
            return None
        total += inner
    return total


def _parameters(comp: Computation) -> Iterator[Instruction]:
    return (i for i in comp.instructions.values() if i.opcode == "parameter")


def _through_bitcasts(comp: Computation, ins: Instruction) -> Instruction:
    while ins.opcode == "bitcast" and ins.operands and ins.operands[0] in comp.instructions:
        ins = comp.instructions[ins.operands[0]]
    return ins


def _loop_bound(computations: dict[str, Computation], condition: str | None) -> int | None:
    """N of a condition `counter < N` with a constant N (the scan loops JAX emits), else None."""
    if condition is None:
        return None
    comp = computations[condition]
    for ins in comp.instructions.values():
        if ins.opcode == "compare" and "direction=LT" in ins.attributes:
            for operand in ins.operands:
                source = comp.instructions.get(operand)
                if source is not None and source.opcode == "constant" and source.arguments.lstrip("-").isdigit():
                    return int(source.arguments)
        if ins.opcode == "fusion":
            bound = _loop_bound(computations, ins.called("calls"))
            if bound is not None:
                return bound
    return None
