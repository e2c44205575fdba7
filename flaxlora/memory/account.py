"""What a compiled step holds at its memory peak, from XLA's own buffer analysis.

XLA writes, per compiled program under ``xla_dump_to``, the optimized HLO and its live ranges
(``*-live-range.txt``: every buffer live at the peak of the heap simulation, with its size). This
module compiles a lowered program with that option, reads both files and sorts each buffer live at
the peak into a category by where it comes from:

    arguments      the program's inputs, by argument (e.g. "state", "frozen", "batch")
    copies         computed from arguments that exclude the data (a bf16 cast of a frozen weight)
    activations    computed from the data in the forward pass (``jvp(...)`` in the op name) and
                   still alive at the peak: what the backward pass reads
    backward       computed from the data in the backward pass (``transpose(jvp(...))``)
    other          the rest (loss, optimizer update, constants)

The same on every backend (CPU, GPU, TPU): the sizes are XLA's, per device.

    account = memory_account(jax.jit(step).lower(state, frozen, batch), ("state", "frozen", "batch"))
    print(account.table())
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from flaxlora.training.compile import compilation_cache_off

CATEGORIES = ("copies", "activations", "backward", "other")
_LINE = re.compile(r"^\s*(ROOT )?%(\S+) = (.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r"\b(calls|body|to_apply)=%([\w.\-]+)")
_INDEX = re.compile(r"\bindex=(\d+)")
_PARAMETER = re.compile(r"^parameter\((\d+)\)")
_PEAK = re.compile(r"^\s*Live ranges at \d+ \(peak\):")
_LIVE = re.compile(r"^\s+(\S+?)\{([\d,]*)\}: (\d+) bytes")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    computation: str
    opcode: str
    operands: tuple[str, ...]
    op_name: str
    shape: str
    parameter: int | None  # parameter number, for a parameter instruction
    index: int | None  # get-tuple-element's index
    called: dict[str, str]  # computations it calls: {"body": while body, "calls": fusion or call, ...}
    root: bool  # its computation's result


def _split_call(rest: str) -> tuple[str, str, str]:
    """``f32[4]{0} add(%a, %b), metadata=...`` -> (shape, opcode, operand text)."""
    if rest.startswith("("):  # a tuple shape
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 2:]
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, end = 1, 0
    for end, c in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0:
            break
    return shape, opcode, rest[:end]


def parse_hlo(text: str) -> tuple[dict[str, Instruction], str]:
    """``({name: Instruction}, entry computation name)`` of an HLO module's text."""
    instructions, computation, entry = {}, "", ""
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            computation = header.group(1)
            entry = computation if line.startswith("ENTRY") else entry
            continue
        m = _LINE.match(line)
        if not m:
            continue
        root, name, rest = m.groups()
        shape, opcode, operands = _split_call(rest)
        op_name = _OP_NAME.search(rest)
        param = _PARAMETER.match(f"{opcode}({operands})") if opcode == "parameter" else None
        index = _INDEX.search(rest) if opcode == "get-tuple-element" else None
        called = dict(_CALLS.findall(rest))
        instructions[name] = Instruction(name, computation, opcode, tuple(_OPERAND.findall(operands)),
                                         op_name.group(1) if op_name else "", shape,
                                         int(param.group(1)) if param else None, int(index.group(1)) if index else None,
                                         called, bool(root))
    # A fusion without metadata of its own: its fused computation's root's (or first) op name.
    by_comp: dict[str, list[Instruction]] = {}
    for ins in instructions.values():
        by_comp.setdefault(ins.computation, []).append(ins)
    for name, ins in instructions.items():
        if not ins.op_name and ins.called.get("calls") in by_comp:
            inner = sorted(by_comp[ins.called["calls"]], key=lambda i: not i.root)
            op_name = next((i.op_name for i in inner if i.op_name), "")
            instructions[name] = dataclasses.replace(ins, op_name=op_name)
    return instructions, entry


def peak_buffers(text: str) -> list[tuple[str, int]]:
    """``[(instruction name, bytes)]`` of every buffer live at the peak, from a ``*-live-range.txt``."""
    lines = iter(text.splitlines())
    for line in lines:
        if _PEAK.match(line):
            break
    else:
        raise ValueError("no 'Live ranges at N (peak)' section in the live-range dump")
    out = []
    for line in lines:
        m = _LIVE.match(line)
        if not m:
            break
        out.append((m.group(1), int(m.group(3))))
    return out


def _argument_of(instructions: dict[str, Instruction], entry: str, names: Sequence[str]) -> dict[str, str]:
    """``{entry parameter: argument name}``: each parameter's op name starts with its argument's
    name (``f['model']...``); the arguments, ordered by their first parameter number, take
    ``names`` in order."""
    params = [i for i in instructions.values() if i.computation == entry and i.parameter is not None]
    prefix = {i.name: re.match(r"[A-Za-z_]\w*", i.op_name).group(0) if re.match(r"[A-Za-z_]", i.op_name) else "?"
              for i in params}
    first: dict[str, int] = {}
    for i in params:
        first[prefix[i.name]] = min(first.get(prefix[i.name], i.parameter), i.parameter)
    order = sorted(first, key=first.get)
    if len(order) != len(names):  # op names that do not follow the pattern: no split by argument
        return {i.name: "arguments" for i in params}
    label = dict(zip(order, names))
    return {i.name: label[prefix[i.name]] for i in params}


def _merge(a: list[frozenset[str]] | None, b: list[frozenset[str]]) -> list[frozenset[str]]:
    """Element-wise union of two tuples' dependencies (one union if their lengths differ)."""
    if a is None:
        return b
    if len(a) == len(b):
        return [x | y for x, y in zip(a, b)]
    return [frozenset().union(*a, *b)]


def _dependencies(instructions: dict[str, Instruction], entry: str,
                  arguments: dict[str, str]) -> dict[str, frozenset[str]]:
    """``{instruction: the arguments it is computed from}``, following tuples element by element
    into while loops (their carry to a fixed point), calls and conditionals; a fusion or any other
    instruction depends on all its operands."""
    by_comp: dict[str, list[Instruction]] = {}
    for ins in instructions.values():
        by_comp.setdefault(ins.computation, []).append(ins)
    roots = {c: next((i.name for i in reversed(body) if i.root), body[-1].name) for c, body in by_comp.items()}
    deps: dict[str, list[frozenset[str]]] = {}  # one set per tuple element (one for an array)
    params: dict[str, dict[int, list[frozenset[str]]]] = {}  # computation -> parameter number -> deps

    def of(name: str) -> list[frozenset[str]]:
        return deps.get(name, [frozenset()])

    def call(comp: str, operands: list[list[frozenset[str]]]) -> list[frozenset[str]]:
        if comp not in by_comp:
            return [frozenset().union(*(frozenset().union(*o) for o in operands))]
        for k, o in enumerate(operands):
            params.setdefault(comp, {})[k] = _merge(params.get(comp, {}).get(k), o)
        visit(comp)
        return of(roots[comp])

    def visit(comp: str) -> None:
        for ins in by_comp[comp]:
            operands = [of(o) for o in ins.operands]
            if ins.name in arguments:
                deps[ins.name] = [frozenset([arguments[ins.name]])]
            elif ins.parameter is not None:
                deps[ins.name] = params.get(comp, {}).get(ins.parameter, [frozenset()])
            elif ins.opcode == "tuple":
                deps[ins.name] = [frozenset().union(*o) for o in operands]
            elif ins.opcode == "get-tuple-element":
                elements = operands[0]
                deps[ins.name] = [elements[ins.index] if ins.index is not None and ins.index < len(elements)
                                  else frozenset().union(*elements)]
            elif ins.opcode == "while" and "body" in ins.called:
                carry = operands[0]
                for _ in range(8):  # the carry's deps grow monotonically to a fixed point
                    out = call(ins.called["body"], [carry])
                    merged = _merge(carry, out)
                    if merged == carry:
                        break
                    carry = merged
                deps[ins.name] = carry
            elif ins.opcode == "call" and "to_apply" in ins.called:
                deps[ins.name] = call(ins.called["to_apply"], operands)
            else:
                deps[ins.name] = [frozenset().union(*(frozenset().union(*o) for o in operands))]

    visit(entry)
    return {n: frozenset().union(*d) for n, d in deps.items()}


def categorize(ins: Instruction | None, depends_on: frozenset[str], data: str) -> str:
    """The category (:data:`CATEGORIES`) of a buffer defined by ``ins`` computed from ``depends_on``."""
    if ins is None:
        return "other"
    if data not in depends_on:
        return "copies" if depends_on else "other"
    if "transpose(" in ins.op_name:
        return "backward"
    if "jvp(" in ins.op_name:
        return "activations"
    return "other"


@dataclasses.dataclass(frozen=True)
class MemoryAccount:
    """XLA's account of one compiled program, per device, in bytes.

    argument/output/alias/temp: ``compiled.memory_analysis()``; peak: the sum of the buffers live
    at the peak of XLA's heap simulation; by_category: that sum split into the arguments (by name)
    and :data:`CATEGORIES`; copies_of: the copies split by the arguments they come from;
    largest: the largest buffers live at the peak as (bytes, category, shape, op name);
    by_op: bytes live at the peak by category and op name, layers folded together (``layers/*``).
    """

    argument: int
    output: int
    alias: int
    temp: int
    peak: int
    by_category: dict[str, int]
    copies_of: dict[str, int]
    largest: list[tuple[int, str, str, str]]
    by_op: dict[str, int]
    note: str = ""

    def table(self, unit: float = 2**20, unit_name: str = "MiB") -> str:
        f = lambda b: f"{b / unit:,.1f} {unit_name}"  # noqa: E731
        lines = [f"memory_analysis: arguments {f(self.argument)}, outputs {f(self.output)} "
                 f"({f(self.alias)} aliased to donated arguments), temporaries {f(self.temp)}",
                 f"live at the peak: {f(self.peak)}" + (f" ({self.note})" if self.note else "")]
        for name, size in self.by_category.items():
            note = ""
            if name == "copies" and self.copies_of:
                note = " (of " + ", ".join(f"{k}: {f(v)}" for k, v in self.copies_of.items()) + ")"
            lines.append(f"  {name:<12} {f(size):>14}  {size / max(self.peak, 1):6.1%}{note}")
        lines.append("by category and op (all layers):")
        lines += [f"  {f(b):>12}  {k[-110:]}" for k, b in self.by_op.items()]
        lines.append("largest buffers live at the peak:")
        lines += [f"  {f(b):>12}  {c:<11} {s:<28} {o[-90:]}" for b, c, s, o in self.largest]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fold_layers(op_name: str) -> str:
    """An op name without the jit/autodiff wrappers and with layer indices as ``*``."""
    name = re.sub(r"/(layers?|block)/\d+/", r"/\1/*/", op_name)
    return name.split("hidden_states/")[-1] if "hidden_states/" in name else name.split("/", 1)[-1]


def account_from_dump(hlo_text: str, live_range_text: str, argument_names: Sequence[str], data: str,
                      analysis: Any, top: int = 12) -> MemoryAccount:
    """:class:`MemoryAccount` from XLA's dumped optimized HLO and live ranges of one program;
    ``analysis``: its ``memory_analysis()``."""
    instructions, entry = parse_hlo(hlo_text)
    arguments = _argument_of(instructions, entry, argument_names)
    deps = _dependencies(instructions, entry, arguments)
    by_category = dict.fromkeys([*dict.fromkeys(arguments.values()), *CATEGORIES], 0)
    copies_of: dict[str, int] = {}
    rows = []
    for name, size in peak_buffers(live_range_text):
        ins = instructions.get(name)
        if name in arguments:
            category = arguments[name]
        else:
            category = categorize(ins, deps.get(name, frozenset()), data)
            if category == "copies":
                key = "+".join(sorted(deps[name]))
                copies_of[key] = copies_of.get(key, 0) + size
        by_category[category] += size
        rows.append((size, category, ins.shape if ins else "?", ins.op_name if ins else name))
    rows.sort(key=lambda r: -r[0])
    by_op: dict[str, int] = {}
    for size, category, shape, op_name in rows:
        key = f"{category}: {_fold_layers(op_name)} {shape.split('{')[0].split('[')[0]}"
        by_op[key] = by_op.get(key, 0) + size
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:top])
    return MemoryAccount(analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                         analysis.alias_size_in_bytes, analysis.temp_size_in_bytes, sum(by_category.values()),
                         by_category, copies_of, rows[:top], by_op)


def memory_account(lowered: jax.stages.Lowered, argument_names: Sequence[str], data: str = "batch",
                   top: int = 12) -> tuple[jax.stages.Compiled, MemoryAccount]:
    """Compiles ``lowered`` with XLA's dumps on and returns ``(compiled, account)``.

    argument_names: a name for each positional argument of the lowered function (e.g. ``("state",
    "frozen", "batch")``); data: the one that holds the examples (what activations are computed from).
    Where XLA writes no live ranges (or in a form not understood), the account holds
    ``memory_analysis()`` alone, its peak everything that allocates, and says so in ``note``.
    """
    with tempfile.TemporaryDirectory(prefix="flaxlora-memory-") as tmp, compilation_cache_off():
        compiled = lowered.compile(compiler_options={"xla_dump_to": tmp})
        analysis = compiled.memory_analysis()
        live = sorted(Path(tmp).glob("*-live-range.txt"), key=lambda p: p.stat().st_size)
        hlo = Path(tmp) / f"{live[-1].name.removesuffix('-live-range.txt')}.txt" if live else None
        try:
            if hlo is None or not hlo.exists():
                raise ValueError(f"XLA wrote no live-range dump on {jax.default_backend()}")
            return compiled, account_from_dump(hlo.read_text(), live[-1].read_text(), argument_names, data,
                                               analysis, top)
        except ValueError as err:  # memory_analysis alone: the peak taken as everything it allocates
            total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes \
                + analysis.temp_size_in_bytes
            return compiled, MemoryAccount(analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                                           analysis.alias_size_in_bytes, analysis.temp_size_in_bytes, total, {}, {}, [],
                                           {}, note=f"no split by kind: {err}")
